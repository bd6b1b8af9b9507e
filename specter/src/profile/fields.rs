//! Field tables: per route, how often each field (a header, a JSON path, the status) differed
//! between live and shadow, and how often it differed in each kind of noise comparison.
//!
//! The counts are what [`crate::compare::noise::classify`] judges; they are kept whole, so a
//! field's classification can change as evidence grows. Array indices in JSON paths are folded
//! into `*` (`/items/*/price`), so a long array is one field per member name, not one per item.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::{
    compare::noise::{self, Classification, Evidence, Judgement, NoiseRule, NoiseSource},
    event::{DiffKind, Difference, Severity},
};

/// Event ids kept per field as examples, newest last.
const EXAMPLES_PER_FIELD: usize = 3;

/// A field: which part of the response, and its path with array indices folded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct FieldKey {
    kind: DiffKind,
    path: String,
}

impl FieldKey {
    pub(super) fn of(difference: &Difference) -> Self {
        let path = match difference.kind {
            DiffKind::Body => fold_indices(&difference.path),
            DiffKind::Header | DiffKind::Status => difference.path.clone(),
        };
        Self {
            kind: difference.kind,
            path,
        }
    }
}

/// `/items/3/price` as `/items/*/price`: every all-digit token becomes `*`.
fn fold_indices(path: &str) -> String {
    if !path.bytes().any(|b| b.is_ascii_digit()) {
        return path.to_owned();
    }
    path.split('/')
        .enumerate()
        .map(|(i, token)| {
            if i > 0 && !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                token
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The counts of one field on one route.
#[derive(Debug, Clone, Default)]
pub(super) struct FieldStats {
    /// The most severe difference seen on it between live and shadow.
    severity: Option<Severity>,
    /// Live-against-shadow comparisons in which it differed.
    differed: u64,
    /// Per [`NoiseSource::index`]: noise comparisons in which it differed.
    noise_differed: [u64; 3],
    /// Events with a counted difference on it, newest last.
    examples: Vec<u64>,
    /// One exact path it was seen under, indices unfolded.
    example_path: String,
}

/// The field table of one route.
#[derive(Debug, Clone, Default)]
pub(super) struct RouteAnalysis {
    /// Live-against-shadow comparisons (the shadow answered).
    pub(super) compared: u64,
    /// Per [`NoiseSource::index`]: noise comparisons.
    pub(super) noise_trials: [u64; 3],
    /// Differences on fields the table had no room for. They always count.
    pub(super) untracked: u64,
    fields: HashMap<FieldKey, FieldStats>,
}

/// The persisted form of a [`RouteAnalysis`], part of the profile snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct TableSnapshot {
    compared: u64,
    noise_trials: [u64; 3],
    untracked: u64,
    fields: Vec<FieldSnapshot>,
}

/// The persisted form of one field's counts.
#[derive(Debug, Serialize, Deserialize)]
struct FieldSnapshot {
    kind: DiffKind,
    path: String,
    severity: Option<Severity>,
    differed: u64,
    noise_differed: [u64; 3],
    #[serde(default)]
    examples: Vec<u64>,
    example_path: String,
}

/// Limits on how many fields are tracked.
pub(super) struct Budget<'a> {
    pub(super) per_route: usize,
    /// Fields tracked over all routes, and the most there may be.
    pub(super) total: &'a mut usize,
    pub(super) max_total: usize,
}

impl Budget<'_> {
    fn room(&self, route_fields: usize) -> bool {
        route_fields < self.per_route && *self.total < self.max_total
    }
}

/// The figures of one field, as the API shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldReport {
    pub kind: DiffKind,
    /// For `body`, a JSON Pointer with array indices as `*`; for `header`, the lower-cased
    /// name; for `status`, "".
    pub path: String,
    pub classification: Classification,
    /// The most severe difference seen on it between live and shadow; none when it only ever
    /// differed in noise comparisons.
    pub severity: Option<Severity>,
    /// Live-against-shadow comparisons of the route, and how many had this field differ.
    pub compared: u64,
    pub differed: u64,
    /// differed / compared.
    pub rate: Option<f64>,
    /// The noise rate it was judged against: the highest among trusted sources.
    pub noise_rate: Option<f64>,
    pub noise_source: Option<NoiseSource>,
    /// Per source: noise comparisons of the route, and how many had this field differ.
    pub noise: NoiseCounts,
    /// The z statistic of the difference rate above the noise rate, when the test ran.
    pub z: Option<f64>,
    /// Ids of recent events with a counted difference on this field.
    pub examples: Vec<u64>,
    /// One exact path it was seen under.
    pub example_path: String,
}

/// A field seen only in noise comparisons and never between live and shadow says nothing about
/// the shadow unless it is noise; it is listed only then.
fn listed(differed: u64, classification: Classification) -> bool {
    differed > 0 || classification == Classification::Noise
}

/// Noise comparisons per source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NoiseCounts {
    pub secondary: SourceCounts,
    pub shadow: SourceCounts,
    pub live: SourceCounts,
}

/// Noise comparisons from one source, and how many had the field differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SourceCounts {
    pub samples: u64,
    pub differed: u64,
}

impl NoiseCounts {
    fn new(trials: &[u64; 3], differed: &[u64; 3]) -> Self {
        let at = |source: NoiseSource| SourceCounts {
            samples: trials[source.index()],
            differed: differed[source.index()],
        };
        Self {
            secondary: at(NoiseSource::Secondary),
            shadow: at(NoiseSource::Shadow),
            live: at(NoiseSource::Live),
        }
    }
}

impl RouteAnalysis {
    /// The classification of the field `difference` is on, from the counts so far.
    pub(super) fn judge(
        &self,
        difference: &Difference,
        rule: &NoiseRule,
        noise_expected: bool,
    ) -> Judgement {
        let field = self.fields.get(&FieldKey::of(difference));
        noise::classify(rule, &self.evidence(field, noise_expected))
    }

    fn evidence(&self, field: Option<&FieldStats>, noise_expected: bool) -> Evidence {
        let mut evidence = Evidence {
            compared: self.compared,
            differed: field.map_or(0, |f| f.differed),
            noise: [(0, 0); 3],
            noise_expected,
        };
        for source in NoiseSource::ALL {
            let i = source.index();
            evidence.noise[i] = (
                self.noise_trials[i],
                field.map_or(0, |f| f.noise_differed[i]),
            );
        }
        evidence
    }

    /// Counts one live-against-shadow comparison and the fields it found different.
    /// `counted_in` is the id of the stored event when the differences counted in it.
    pub(super) fn record_compared(
        &mut self,
        differences: &[Difference],
        counted_in: Option<u64>,
        budget: &mut Budget<'_>,
    ) {
        self.compared += 1;
        let mut seen = HashSet::new();
        for difference in differences {
            let key = FieldKey::of(difference);
            if !seen.insert(key.clone()) {
                continue;
            }
            let Some(field) = self.field(key, difference, budget) else {
                self.untracked += 1;
                continue;
            };
            field.differed += 1;
            field.severity = field.severity.max(Some(difference.severity));
            if let Some(id) = counted_in.filter(|_| !difference.noise) {
                if field.examples.len() == EXAMPLES_PER_FIELD {
                    field.examples.remove(0);
                }
                field.examples.push(id);
            }
        }
    }

    /// Counts one noise comparison and the fields it found different.
    pub(super) fn record_noise(
        &mut self,
        source: NoiseSource,
        differences: &[Difference],
        budget: &mut Budget<'_>,
    ) {
        let i = source.index();
        self.noise_trials[i] += 1;
        let mut seen = HashSet::new();
        for difference in differences {
            let key = FieldKey::of(difference);
            if !seen.insert(key.clone()) {
                continue;
            }
            if let Some(field) = self.field(key, difference, budget) {
                field.noise_differed[i] += 1;
            }
        }
    }

    fn field(
        &mut self,
        key: FieldKey,
        difference: &Difference,
        budget: &mut Budget<'_>,
    ) -> Option<&mut FieldStats> {
        if !self.fields.contains_key(&key) {
            if !budget.room(self.fields.len()) {
                return None;
            }
            *budget.total += 1;
            self.fields.insert(
                key.clone(),
                FieldStats {
                    example_path: difference.path.clone(),
                    ..FieldStats::default()
                },
            );
        }
        self.fields.get_mut(&key)
    }

    pub(super) fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// The table in its persisted form, fields in a stable order.
    pub(super) fn snapshot(&self) -> TableSnapshot {
        let mut fields: Vec<FieldSnapshot> = self
            .fields
            .iter()
            .map(|(key, field)| FieldSnapshot {
                kind: key.kind,
                path: key.path.clone(),
                severity: field.severity,
                differed: field.differed,
                noise_differed: field.noise_differed,
                examples: field.examples.clone(),
                example_path: field.example_path.clone(),
            })
            .collect();
        fields.sort_by(|a, b| (a.kind as u8, &a.path).cmp(&(b.kind as u8, &b.path)));
        TableSnapshot {
            compared: self.compared,
            noise_trials: self.noise_trials,
            untracked: self.untracked,
            fields,
        }
    }

    /// A table from its persisted form. The snapshot was taken under the field budget, so it
    /// holds no more fields than the budget allowed then.
    pub(super) fn restore(snapshot: TableSnapshot) -> Self {
        let fields = snapshot
            .fields
            .into_iter()
            .map(|field| {
                let key = FieldKey {
                    kind: field.kind,
                    path: field.path,
                };
                let mut examples = field.examples;
                let excess = examples.len().saturating_sub(EXAMPLES_PER_FIELD);
                examples.drain(..excess);
                let stats = FieldStats {
                    severity: field.severity,
                    differed: field.differed,
                    noise_differed: field.noise_differed,
                    examples,
                    example_path: field.example_path,
                };
                (key, stats)
            })
            .collect();
        Self {
            compared: snapshot.compared,
            noise_trials: snapshot.noise_trials,
            untracked: snapshot.untracked,
            fields,
        }
    }

    /// Keeps at most `per_route` fields, for a table restored under a lower
    /// `compare.max_fields_per_route` than it was built with: those that differed most between
    /// live and shadow stay, then those that differed most in noise comparisons. The differences
    /// on the fields let go count as untracked from then on. Returns how many were let go.
    pub(super) fn trim(&mut self, per_route: usize) -> usize {
        let excess = self.fields.len().saturating_sub(per_route);
        if excess == 0 {
            return 0;
        }
        let mut ranked: Vec<(FieldKey, u64, u64)> = self
            .fields
            .iter()
            .map(|(key, field)| {
                let noise: u64 = field.noise_differed.iter().sum();
                (key.clone(), field.differed, noise)
            })
            .collect();
        ranked.sort_by(|a, b| {
            (a.1, a.2)
                .cmp(&(b.1, b.2))
                .then_with(|| (b.0.kind as u8, &b.0.path).cmp(&(a.0.kind as u8, &a.0.path)))
        });
        for (key, _, _) in ranked.into_iter().take(excess) {
            if let Some(field) = self.fields.remove(&key) {
                self.untracked += field.differed;
            }
        }
        excess
    }

    /// Drops the example event ids: they name events in one node's store, and mean nothing
    /// once the table is added to another node's.
    pub(super) fn forget_examples(&mut self) {
        for field in self.fields.values_mut() {
            field.examples.clear();
        }
    }

    /// Adds `other`'s counts to these, for two routes that became one.
    pub(super) fn merge(&mut self, other: RouteAnalysis) {
        self.compared += other.compared;
        self.untracked += other.untracked;
        for i in 0..3 {
            self.noise_trials[i] += other.noise_trials[i];
        }
        for (key, theirs) in other.fields {
            let ours = self.fields.entry(key).or_insert_with(|| FieldStats {
                example_path: theirs.example_path.clone(),
                ..FieldStats::default()
            });
            ours.differed += theirs.differed;
            ours.severity = ours.severity.max(theirs.severity);
            for i in 0..3 {
                ours.noise_differed[i] += theirs.noise_differed[i];
            }
            ours.examples.extend(theirs.examples);
            ours.examples.sort_unstable();
            let excess = ours.examples.len().saturating_sub(EXAMPLES_PER_FIELD);
            ours.examples.drain(..excess);
        }
    }

    /// The classification of every field [`RouteAnalysis::reports`] lists, without building
    /// the reports.
    pub(super) fn classifications(
        &self,
        rule: &NoiseRule,
        noise_expected: bool,
    ) -> impl Iterator<Item = Classification> + '_ {
        let rule = *rule;
        self.fields.values().filter_map(move |field| {
            let judgement = noise::classify(&rule, &self.evidence(Some(field), noise_expected));
            listed(field.differed, judgement.classification).then_some(judgement.classification)
        })
    }

    /// Every field with its classification: divergences first (most severe, then most
    /// frequent), then fields still pending, then noise (noisiest first).
    pub(super) fn reports(&self, rule: &NoiseRule, noise_expected: bool) -> Vec<FieldReport> {
        let mut reports: Vec<FieldReport> = self
            .fields
            .iter()
            .map(|(key, field)| {
                let judgement = noise::classify(rule, &self.evidence(Some(field), noise_expected));
                FieldReport {
                    kind: key.kind,
                    path: key.path.clone(),
                    classification: judgement.classification,
                    severity: field.severity,
                    compared: self.compared,
                    differed: field.differed,
                    rate: judgement.rate,
                    noise_rate: judgement.noise_rate,
                    noise_source: judgement.noise_source,
                    noise: NoiseCounts::new(&self.noise_trials, &field.noise_differed),
                    z: judgement.z,
                    examples: field.examples.iter().rev().copied().collect(),
                    example_path: field.example_path.clone(),
                }
            })
            .filter(|r| listed(r.differed, r.classification))
            .collect();

        let rank = |c: Classification| match c {
            Classification::Divergence => 0,
            Classification::Pending => 1,
            Classification::Noise => 2,
        };
        reports.sort_by(|a, b| {
            rank(a.classification)
                .cmp(&rank(b.classification))
                .then_with(|| match a.classification {
                    Classification::Noise => b
                        .noise_rate
                        .unwrap_or(0.0)
                        .total_cmp(&a.noise_rate.unwrap_or(0.0)),
                    _ => b.severity.cmp(&a.severity),
                })
                .then(b.differed.cmp(&a.differed))
                .then_with(|| (a.kind as u8, &a.path).cmp(&(b.kind as u8, &b.path)))
        });
        reports
    }
}
