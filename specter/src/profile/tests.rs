use std::time::Duration;

use super::*;

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
