//! What the field tables cost the profile snapshot, which the recorder writes to the store with
//! every commit (at most every 512 events, at least every 250 ms while figures change) and a
//! cluster member serves for cluster-wide figures.
//!
//! For each shape, two profiles see the same exchanges on the same routes; in one every
//! exchange matches, in the other every exchange differs on `fields` body fields, so it holds
//! full field tables. The bench prints both snapshots' size and time, side by side, and their
//! ratio, then the time of a store commit's snapshot, which reuses the field tables'
//! serialisation for a few seconds. `cargo bench -p specter --bench snapshot`.

use std::time::{Duration, Instant};

use specter::{
    event::{DiffKind, DiffOp, Difference, Severity},
    profile::{Mirrored, Profile},
};

/// (routes, fields per route, exchanges per route).
const SHAPES: [(usize, usize, usize); 3] = [(20, 10, 200), (50, 50, 200), (200, 200, 200)];

fn difference(path: String) -> Difference {
    Difference {
        kind: DiffKind::Body,
        path,
        op: DiffOp::Changed,
        live: Some(serde_json::json!(1)),
        shadow: Some(serde_json::json!(2)),
        severity: Severity::Value,
        noise: false,
    }
}

fn profile(routes: usize, fields: usize, exchanges: usize, differing: bool) -> Profile {
    let profile = Profile::new();
    let mut id = 0;
    for r in 0..routes {
        let route = format!("GET /r{r}");
        for _ in 0..exchanges {
            let mut differences: Vec<Difference> = if differing {
                (0..fields).map(|f| difference(format!("/f{f}"))).collect()
            } else {
                Vec::new()
            };
            let outcome = profile.judge(&route, &mut differences);
            profile.record_mirrored(&Mirrored {
                route: &route,
                outcome,
                live_status: 200,
                shadow_status: Some(200),
                live_latency: Duration::from_micros(900 + (id % 300)),
                shadow_latency: Some(Duration::from_micros(1000 + (id % 400))),
                differences: &differences,
                event_id: Some(id),
            });
            id += 1;
        }
    }
    profile
}

const ROUNDS: u32 = 20;

/// The snapshot's size in bytes and the mean time to take it.
fn measure(profile: &Profile) -> (usize, Duration) {
    let size = profile.snapshot().len();
    let started = Instant::now();
    for _ in 0..ROUNDS {
        std::hint::black_box(profile.snapshot());
    }
    (size, started.elapsed() / ROUNDS)
}

/// The mean time of a store commit's snapshot, the field tables serialised just before.
fn measure_store(profile: &Profile) -> Duration {
    profile.snapshot();
    let started = Instant::now();
    for _ in 0..ROUNDS {
        std::hint::black_box(profile.snapshot_for_store());
    }
    started.elapsed() / ROUNDS
}

fn main() {
    println!(
        "{:>6} {:>7} {:>12} {:>12} {:>6} {:>9} {:>9} {:>6} {:>9} {:>6}",
        "routes",
        "fields",
        "bytes plain",
        "bytes tables",
        "ratio",
        "ms plain",
        "ms tables",
        "ratio",
        "ms store",
        "ratio"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (routes, fields, exchanges) in SHAPES {
        let (plain_size, plain_time) = measure(&profile(routes, fields, exchanges, false));
        let tables = profile(routes, fields, exchanges, true);
        let (table_size, table_time) = measure(&tables);
        let store_time = measure_store(&tables);
        println!(
            "{routes:>6} {fields:>7} {plain_size:>12} {table_size:>12} {:>6.2} {:>9.3} {:>9.3} \
             {:>6.2} {:>9.3} {:>6.2}",
            table_size as f64 / plain_size as f64,
            ms(plain_time),
            ms(table_time),
            table_time.as_secs_f64() / plain_time.as_secs_f64(),
            ms(store_time),
            store_time.as_secs_f64() / plain_time.as_secs_f64(),
        );
    }
}
