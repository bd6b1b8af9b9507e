use std::time::Duration;

use super::*;
use crate::{
    compare::noise::{Classification, NoiseSource},
    event::{DiffKind, DiffOp, Difference, Severity},
};

#[test]
fn ids_in_paths_become_one_route() {
    assert_eq!(route_of("GET", "/users/123"), "GET /users/{id}");
    assert_eq!(route_of("GET", "/users/456"), "GET /users/{id}");
    assert_eq!(
        route_of("GET", "/orders/3f2504e0-4f89-11d3-9a0c-0305e82c3301/items"),
        "GET /orders/{id}/items"
    );
    assert_eq!(
        route_of("GET", "/blobs/0123456789abcdef0123"),
        "GET /blobs/{id}"
    );
    assert_eq!(route_of("GET", "/users/me"), "GET /users/me");
    assert_eq!(route_of("POST", "/"), "POST /");
}

#[test]
fn outcomes_add_up_and_match_rate_ignores_errors() {
    let profile = Profile::new();
    let ms = Duration::from_millis;
    profile.record("GET /a", Outcome::Matched, ms(2), Some(ms(3)));
    profile.record("GET /a", Outcome::Matched, ms(2), Some(ms(3)));
    profile.record("GET /a", Outcome::Diverged, ms(2), Some(ms(3)));
    profile.record("GET /b", Outcome::ShadowError, ms(2), None);

    let view = profile.view();
    let c = view.counters;
    assert_eq!(
        (c.mirrored, c.matched, c.diverged, c.shadow_errors),
        (4, 2, 1, 1)
    );
    assert_eq!(view.match_rate, Some(2.0 / 3.0));
    assert_eq!(view.live_latency.count, 4);
    assert_eq!(view.shadow_latency.count, 3);
    let a = view.routes.iter().find(|r| r.route == "GET /a").unwrap();
    assert_eq!((a.counters.mirrored, a.counters.diverged), (3, 1));
}

#[test]
fn no_match_rate_before_any_comparison() {
    let profile = Profile::new();
    profile.record(
        "GET /x",
        Outcome::ShadowError,
        Duration::from_millis(1),
        None,
    );
    assert_eq!(profile.view().match_rate, None);
}

#[test]
fn routes_beyond_the_limit_go_to_other() {
    let profile = Profile::new();
    for i in 0..MAX_ROUTES + 50 {
        profile.record(
            &format!("GET /r{i}"),
            Outcome::Matched,
            Duration::from_millis(1),
            None,
        );
    }
    let view = profile.view();
    assert_eq!(view.routes.len(), MAX_ROUTES + 1);
    let other = view.routes.iter().find(|r| r.route == OTHER_ROUTE).unwrap();
    assert_eq!(other.counters.mirrored, 50);
}

#[test]
fn snapshot_restores_counters_routes_and_latencies() {
    let profile = Profile::new();
    profile.tally(Tally::Seen);
    profile.tally(Tally::SampledOut);
    profile.record(
        "GET /a",
        Outcome::Diverged,
        Duration::from_millis(7),
        Some(Duration::from_millis(9)),
    );

    let restored = Profile::restore(&profile.snapshot()).unwrap();
    let (before, after) = (profile.view(), restored.view());
    assert_eq!(before.counters, after.counters);
    assert_eq!(before.routes, after.routes);
    assert_eq!(before.live_latency, after.live_latency);
    assert_eq!(before.shadow_latency, after.shadow_latency);
}

#[test]
fn corrupt_snapshot_is_an_error_not_a_panic() {
    assert!(Profile::restore(b"not json").is_err());
    assert!(
        Profile::restore(br#"{"counters":{},"routes":{},"live_latency":"!!","shadow_latency":""}"#)
            .is_err()
    );
}

fn templates(patterns: &[&str], max_segment_values: usize) -> RouteTemplates {
    RouteTemplates::new(
        patterns
            .iter()
            .map(|p| RoutePattern::parse(p).unwrap())
            .collect(),
        max_segment_values,
    )
}

#[test]
fn long_tokens_become_ids_but_words_do_not() {
    assert_eq!(route_of("GET", "/s/aB3dE5gH7jK9mN1pQ3sT5v"), "GET /s/{id}");
    assert_eq!(
        route_of("GET", "/docs/authentication-settings"),
        "GET /docs/authentication-settings"
    );
}

#[test]
fn users_123_and_456_are_one_route() {
    let profile = Profile::new();
    assert_eq!(profile.route("GET", "/users/123"), "GET /users/{id}");
    assert_eq!(profile.route("GET", "/users/456"), "GET /users/{id}");
}

#[test]
fn ten_thousand_random_names_under_one_prefix_make_one_route() {
    let profile = Profile::new();
    profile.configure(Settings::default(), templates(&[], 50));
    let ms = Duration::from_millis(1);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..10_000 {
        // Letters only, so no name looks like an id by itself.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let name: String = (0..8)
            .map(|i| char::from(b'a' + ((seed >> (i * 5)) % 26) as u8))
            .collect();
        let route = profile.route("GET", &format!("/files/{name}/meta"));
        profile.record(&route, Outcome::Matched, ms, Some(ms));
    }

    let view = profile.view();
    let routes: Vec<&str> = view.routes.iter().map(|r| r.route.as_str()).collect();
    assert_eq!(routes, ["GET /files/{id}/meta"]);
    assert_eq!(view.routes[0].counters.mirrored, 10_000);
}

#[test]
fn configured_patterns_win_over_templates() {
    let mut templates = templates(&["GET /users/{uid}/avatar", "* /static/**"], 100);
    assert_eq!(
        templates.route("GET", "/users/ada/avatar").route,
        "GET /users/{uid}/avatar"
    );
    assert_eq!(
        templates.route("HEAD", "/static/css/site.css").route,
        "HEAD /static/**"
    );
    assert_eq!(templates.route("GET", "/users/ada").route, "GET /users/ada");
    assert!(RoutePattern::parse("GET users").is_err());
    assert!(RoutePattern::parse("GET /a/**/b").is_err());
}

fn body_diff(path: &str) -> Difference {
    Difference {
        kind: DiffKind::Body,
        path: path.to_owned(),
        op: DiffOp::Changed,
        live: Some(serde_json::json!(1)),
        shadow: Some(serde_json::json!(2)),
        severity: Severity::Value,
        noise: false,
    }
}

fn learning_profile() -> Profile {
    let profile = Profile::new();
    let mut settings = Settings::default();
    settings.noise_rule.min_samples = 20;
    settings.noise_rule.min_noise_samples = 10;
    profile.configure(settings, templates(&[], 100));
    profile
}

/// Mirrors one exchange whose differences are `paths`, as the pipeline would.
fn mirror(profile: &Profile, route: &str, paths: &[&str], id: u64) -> (Outcome, Vec<Difference>) {
    let mut differences: Vec<Difference> = paths.iter().map(|p| body_diff(p)).collect();
    let outcome = profile.judge(route, &mut differences);
    profile.record_mirrored(&Mirrored {
        route,
        outcome,
        live_status: 200,
        shadow_status: Some(200),
        live_latency: Duration::from_millis(2),
        shadow_latency: Some(Duration::from_millis(2)),
        differences: &differences,
        event_id: Some(id),
    });
    (outcome, differences)
}

#[test]
fn noise_fields_stop_counting_once_classified_and_the_real_one_keeps_counting() {
    let profile = learning_profile();
    let route = "GET /noise";

    // Warm-up: nothing is classified yet, so every difference counts.
    for id in 0..20 {
        let (outcome, differences) = mirror(&profile, route, &["/request_id", "/value"], id);
        assert_eq!(outcome, Outcome::Diverged);
        assert!(differences.iter().all(|d| !d.noise));
        profile.record_noise(route, NoiseSource::Live, Some(&[body_diff("/request_id")]));
    }

    let (outcome, differences) = mirror(&profile, route, &["/request_id", "/value"], 100);
    assert_eq!(outcome, Outcome::Diverged);
    let noise: Vec<(&str, bool)> = differences
        .iter()
        .map(|d| (d.path.as_str(), d.noise))
        .collect();
    assert_eq!(noise, [("/request_id", true), ("/value", false)]);

    // Only noise left: the exchange matched.
    let (outcome, differences) = mirror(&profile, route, &["/request_id"], 101);
    assert_eq!(outcome, Outcome::Matched);
    assert!(differences[0].noise);

    let fields = profile.route_fields(route).unwrap();
    let class = |path: &str| {
        fields
            .fields
            .iter()
            .find(|f| f.path == path)
            .map(|f| f.classification)
    };
    assert_eq!(class("/request_id"), Some(Classification::Noise));
    assert_eq!(class("/value"), Some(Classification::Divergence));
    let value = fields.fields.iter().find(|f| f.path == "/value").unwrap();
    assert_eq!(value.examples.first(), Some(&100), "newest example first");

    let report = profile.route_report(route).unwrap();
    assert_eq!(report.top_fields[0].path, "/value");
    assert_eq!(report.noisy_fields[0].path, "/request_id");
    let c = report.view.counters;
    assert_eq!(c.mirrored, c.matched + c.diverged + c.shadow_errors);
    assert_eq!((c.matched, c.diverged), (1, 21));
}

/// A profile with `settings` that has seen `rounds` exchanges on /noise, each differing on
/// /request_id and /value, with a live repeat differing on /request_id only; event ids start
/// at `first_id`.
fn noisy_route(rounds: u64, first_id: u64) -> Profile {
    let profile = learning_profile();
    for id in first_id..first_id + rounds {
        mirror(&profile, "GET /noise", &["/request_id", "/value"], id);
        profile.record_noise(
            "GET /noise",
            NoiseSource::Live,
            Some(&[body_diff("/request_id")]),
        );
    }
    profile
}

/// A restored snapshot, configured again as the pipeline does on start.
fn restarted(profile: &Profile) -> Profile {
    let restored = Profile::restore(&profile.snapshot()).unwrap();
    restored.configure(profile.settings(), templates(&[], 100));
    restored
}

#[test]
fn learned_noise_survives_a_restart() {
    let before = noisy_route(20, 0);
    let after = restarted(&before);
    assert_eq!(
        after.route_fields("GET /noise"),
        before.route_fields("GET /noise")
    );

    // The first exchange after the restart is judged on what was learned before it.
    let (outcome, differences) = mirror(&after, "GET /noise", &["/request_id"], 100);
    assert_eq!(outcome, Outcome::Matched, "{differences:?}");
    assert!(differences[0].noise);
    let fields = after.route_fields("GET /noise").unwrap();
    let request_id = fields
        .fields
        .iter()
        .find(|f| f.path == "/request_id")
        .unwrap();
    assert_eq!(request_id.classification, Classification::Noise);
    assert_eq!(request_id.differed, 21);
}

#[test]
fn merged_field_tables_judge_on_every_nodes_evidence() {
    // Two nodes with 12 exchanges each: neither has the 20 comparisons a judgement needs.
    let node_a = noisy_route(12, 0);
    let node_b = noisy_route(12, 500);
    for node in [&node_a, &node_b] {
        let fields = node.route_fields("GET /noise").unwrap();
        assert!(
            fields
                .fields
                .iter()
                .all(|f| f.classification == Classification::Pending),
            "{fields:?}"
        );
    }

    let merged = restarted(&node_a);
    merged.merge_snapshot(&node_b.snapshot()).unwrap();
    let fields = merged.route_fields("GET /noise").unwrap();
    let field = |path: &str| fields.fields.iter().find(|f| f.path == path).unwrap();
    assert_eq!(field("/request_id").classification, Classification::Noise);
    assert_eq!(field("/value").classification, Classification::Divergence);
    assert_eq!(field("/value").compared, 24);
    assert_eq!(field("/value").differed, 24);
    assert_eq!(field("/request_id").noise.live.samples, 24);
    // Example ids are node-local: only the merging node's own are kept.
    assert!(field("/value").examples.iter().all(|id| *id < 500));
    assert!(!field("/value").examples.is_empty());
}

#[test]
fn a_snapshot_without_field_tables_still_restores() {
    let profile = noisy_route(3, 0);
    let mut snapshot: serde_json::Value = serde_json::from_slice(&profile.snapshot()).unwrap();
    snapshot.as_object_mut().unwrap().remove("fields");
    let restored = Profile::restore(&serde_json::to_vec(&snapshot).unwrap()).unwrap();
    assert_eq!(restored.counters().mirrored, 3);
    assert!(
        restored
            .route_fields("GET /noise")
            .is_some_and(|f| f.fields.is_empty())
    );
}

#[test]
fn array_indices_fold_into_one_field() {
    let profile = learning_profile();
    mirror(
        &profile,
        "GET /a",
        &["/items/0/price", "/items/12/price"],
        1,
    );
    let fields = profile.route_fields("GET /a").unwrap().fields;
    assert_eq!(fields.len(), 1);
    assert_eq!(fields[0].path, "/items/*/price");
    assert_eq!(fields[0].differed, 1, "counted once per exchange");
}

#[test]
fn field_tables_are_capped_per_route_and_overflow_still_counts() {
    let profile = Profile::new();
    profile.configure(
        Settings {
            max_fields_per_route: 3,
            ..Settings::default()
        },
        templates(&[], 100),
    );
    let paths: Vec<String> = (0..10).map(|i| format!("/f{i}")).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let (outcome, _) = mirror(&profile, "GET /wide", &paths, 1);
    assert_eq!(outcome, Outcome::Diverged);
    let report = profile.route_report("GET /wide").unwrap();
    assert_eq!(report.fields.untracked_differences, 7);
    assert_eq!(profile.route_fields("GET /wide").unwrap().fields.len(), 3);
}

#[test]
fn a_lowered_field_cap_trims_a_restored_table_to_the_fields_that_differed_most() {
    let profile = Profile::new();
    let wide = ["/hot", "/warm", "/c1", "/c2", "/c3", "/c4", "/c5"];
    mirror(&profile, "GET /wide", &wide, 1);
    mirror(&profile, "GET /wide", &["/hot", "/warm"], 2);
    mirror(&profile, "GET /wide", &["/hot"], 3);
    assert_eq!(profile.route_fields("GET /wide").unwrap().fields.len(), 7);

    let restored = Profile::restore(&profile.snapshot()).unwrap();
    restored.configure(
        Settings {
            max_fields_per_route: 2,
            ..Settings::default()
        },
        templates(&[], 100),
    );
    let fields = restored.route_fields("GET /wide").unwrap().fields;
    let kept: Vec<(&str, u64)> = fields
        .iter()
        .map(|f| (f.path.as_str(), f.differed))
        .collect();
    assert_eq!(kept, [("/hot", 3), ("/warm", 2)]);
    let report = restored.route_report("GET /wide").unwrap();
    assert_eq!(report.fields.untracked_differences, 5);

    // A field let go is not tracked again: its differences keep counting as untracked.
    mirror(&restored, "GET /wide", &["/c1"], 4);
    assert_eq!(restored.route_fields("GET /wide").unwrap().fields.len(), 2);
    let report = restored.route_report("GET /wide").unwrap();
    assert_eq!(report.fields.untracked_differences, 6);
}

#[test]
fn status_matrix_and_noise_replays_are_per_route_and_survive_a_snapshot() {
    let profile = learning_profile();
    profile.record_mirrored(&Mirrored {
        route: "GET /x",
        outcome: Outcome::Diverged,
        live_status: 200,
        shadow_status: Some(500),
        live_latency: Duration::from_millis(3),
        shadow_latency: Some(Duration::from_millis(4)),
        differences: &[],
        event_id: None,
    });
    profile.record_mirrored(&Mirrored {
        route: "GET /x",
        outcome: Outcome::ShadowError,
        live_status: 200,
        shadow_status: None,
        live_latency: Duration::from_millis(3),
        shadow_latency: None,
        differences: &[],
        event_id: None,
    });
    profile.record_noise("GET /x", NoiseSource::Shadow, None);

    let restored = Profile::restore(&profile.snapshot()).unwrap();
    for profile in [&profile, &restored] {
        let report = profile.route_report("GET /x").unwrap();
        assert_eq!(report.status_matrix["200"]["500"], 1);
        assert_eq!(report.status_matrix["200"]["error"], 1);
        assert_eq!(report.noise_replays, 1);
        assert_eq!(report.latency.live.count, 2);
        assert_eq!(report.latency.shadow.count, 1);
        assert_eq!(profile.counters().noise_replays, 1);
        assert_eq!(
            profile.counters().mirrored,
            2,
            "noise replays are not mirrored"
        );
    }
    assert_eq!(profile.view().routes, restored.view().routes);
}

#[test]
fn match_rate_has_a_confidence_interval_and_latency_a_ratio() {
    let profile = Profile::new();
    for i in 0..100 {
        let outcome = if i < 90 {
            Outcome::Matched
        } else {
            Outcome::Diverged
        };
        profile.record(
            "GET /r",
            outcome,
            Duration::from_millis(10),
            Some(Duration::from_millis(30)),
        );
    }
    let route = &profile.view().routes[0];
    let [low, high] = route.match_rate_ci.unwrap();
    assert!(low < 0.9 && 0.9 < high && high - low < 0.15, "{low} {high}");
    let ratio = route.latency_ratio.unwrap();
    assert!((2.9..3.1).contains(&ratio), "{ratio}");
    assert!(route.shadow_slower);
}

fn criteria(min_samples: u64) -> Criteria {
    Criteria {
        min_match_rate: 0.99,
        min_samples,
        max_latency_ratio: 1.2,
    }
}

#[test]
fn verdict_passes_fails_or_waits_for_evidence() {
    let profile = learning_profile();
    let ms = Duration::from_millis(5);
    for _ in 0..50 {
        profile.record("GET /good", Outcome::Matched, ms, Some(ms));
    }
    let verdict = profile.verdict(&criteria(50));
    assert_eq!(verdict.verdict, Decision::Pass);
    assert_eq!(verdict.verdict.exit_code(), 0);

    let verdict = profile.verdict(&criteria(51));
    assert_eq!(verdict.verdict, Decision::InsufficientEvidence);
    assert_eq!(verdict.verdict.exit_code(), 2);
    assert!(verdict.routes[0].reasons[0].contains("50 of the 51"));

    for _ in 0..50 {
        profile.record("GET /bad", Outcome::Diverged, ms, Some(ms));
    }
    let verdict = profile.verdict(&criteria(50));
    assert_eq!(verdict.verdict, Decision::Fail);
    assert_eq!(verdict.verdict.exit_code(), 1);
    let bad = verdict
        .routes
        .iter()
        .find(|r| r.route == "GET /bad")
        .unwrap();
    assert!(bad.reasons[0].contains("match rate"), "{:?}", bad.reasons);
}

#[test]
fn verdict_waits_while_fields_are_pending_and_fails_on_errors_or_latency() {
    let profile = learning_profile();
    // Differences on a field that noise learning has not classified: no verdict yet.
    for id in 0..30 {
        mirror(&profile, "GET /p", &["/x"], id);
    }
    let verdict = profile.verdict(&criteria(10));
    assert_eq!(verdict.verdict, Decision::InsufficientEvidence);
    assert_eq!(verdict.routes[0].pending_fields, 1);

    let slow = Profile::new();
    for _ in 0..30 {
        slow.record(
            "GET /s",
            Outcome::Matched,
            Duration::from_millis(10),
            Some(Duration::from_millis(40)),
        );
        slow.record(
            "GET /e",
            Outcome::ShadowError,
            Duration::from_millis(10),
            None,
        );
    }
    let verdict = slow.verdict(&criteria(10));
    for route in &verdict.routes {
        assert_eq!(route.verdict, Decision::Fail, "{route:?}");
    }
}
