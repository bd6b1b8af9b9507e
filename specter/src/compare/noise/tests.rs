use bytes::Bytes;

use super::*;
use crate::exchange::Headers;

const RULE: NoiseRule = NoiseRule {
    min_samples: 30,
    min_noise_samples: 10,
    z: 3.0,
    margin: 0.05,
};

fn evidence(
    compared: u64,
    differed: u64,
    source: NoiseSource,
    trials: u64,
    noisy: u64,
) -> Evidence {
    let mut evidence = Evidence {
        compared,
        differed,
        noise: [(0, 0); 3],
        noise_expected: true,
    };
    evidence.noise[source.index()] = (trials, noisy);
    evidence
}

#[test]
fn a_field_that_differs_as_often_as_its_noise_is_noise() {
    let judged = classify(&RULE, &evidence(100, 100, NoiseSource::Secondary, 40, 40));
    assert_eq!(judged.classification, Classification::Noise);
    assert_eq!(judged.noise_rate, Some(1.0));

    // A timestamp that collides now and then on one side: still noise.
    let judged = classify(&RULE, &evidence(100, 97, NoiseSource::Shadow, 40, 36));
    assert_eq!(judged.classification, Classification::Noise);
}

#[test]
fn a_field_never_seen_in_noise_is_a_divergence() {
    let judged = classify(&RULE, &evidence(100, 100, NoiseSource::Live, 40, 0));
    assert_eq!(judged.classification, Classification::Divergence);
    // Even a rare one: noise needs positive evidence.
    let judged = classify(&RULE, &evidence(1000, 1, NoiseSource::Live, 40, 0));
    assert_eq!(judged.classification, Classification::Divergence);
}

#[test]
fn a_field_clearly_above_its_noise_rate_is_a_divergence() {
    // Noisy one time in ten, but different every time between live and shadow.
    let judged = classify(&RULE, &evidence(200, 200, NoiseSource::Shadow, 100, 10));
    assert_eq!(judged.classification, Classification::Divergence);
    assert!(judged.z.unwrap() > 3.0);

    // A small excess is within the margin: noise.
    let judged = classify(
        &RULE,
        &evidence(10_000, 1_300, NoiseSource::Shadow, 10_000, 1_000),
    );
    assert!(judged.z.unwrap() > 3.0);
    assert_eq!(judged.classification, Classification::Noise);
}

#[test]
fn the_noisiest_trusted_source_is_the_reference() {
    let mut both = evidence(100, 90, NoiseSource::Shadow, 50, 20);
    both.noise[NoiseSource::Live.index()] = (20, 19);
    let judged = classify(&RULE, &both);
    assert_eq!(judged.noise_source, Some(NoiseSource::Live));
    assert_eq!(judged.classification, Classification::Noise);

    // A source below min_noise_samples is not trusted, however noisy.
    both.noise[NoiseSource::Live.index()] = (5, 5);
    let judged = classify(&RULE, &both);
    assert_eq!(judged.noise_source, Some(NoiseSource::Shadow));
    assert_eq!(judged.classification, Classification::Divergence);
}

#[test]
fn too_few_samples_leave_a_field_pending() {
    let judged = classify(&RULE, &evidence(29, 29, NoiseSource::Live, 40, 0));
    assert_eq!(judged.classification, Classification::Pending);
    let judged = classify(&RULE, &evidence(100, 100, NoiseSource::Live, 9, 9));
    assert_eq!(judged.classification, Classification::Pending);

    // Without a noise source that can apply, only the sample count matters.
    let mut unsafe_route = evidence(100, 3, NoiseSource::Live, 0, 0);
    unsafe_route.noise_expected = false;
    assert_eq!(
        classify(&RULE, &unsafe_route).classification,
        Classification::Divergence
    );
}

#[test]
fn wilson_interval_stays_within_bounds_and_narrows() {
    let (low, high) = wilson_interval(100, 100, 1.96).unwrap();
    assert!(low > 0.96 && low < 0.97, "{low}");
    assert_eq!(high, 1.0);
    let (low, high) = wilson_interval(0, 10, 1.96).unwrap();
    assert_eq!(low, 0.0);
    assert!(high > 0.27 && high < 0.28, "{high}");
    let narrow = wilson_interval(5000, 10_000, 1.96).unwrap();
    assert!(narrow.1 - narrow.0 < 0.02);
    assert_eq!(wilson_interval(0, 0, 1.96), None);
}

#[test]
fn z_statistic_is_zero_without_variance() {
    assert_eq!(z_statistic(10, 10, 10, 10), 0.0);
    assert_eq!(z_statistic(0, 10, 0, 10), 0.0);
    assert!(z_statistic(10, 10, 0, 10) > 4.0);
}

fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> Request {
    Request {
        method: method.into(),
        target: target.into(),
        version: 1,
        headers: Headers(
            headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
        ),
        body: Bytes::new(),
    }
}

fn answer(body: &str) -> Response {
    Response {
        status: 200,
        headers: Headers::default(),
        body: Bytes::from(body.to_owned()),
    }
}

#[test]
fn identical_safe_requests_share_a_key_and_credentials_split_it() {
    let a = LiveNoiseCache::key(&request("GET", "/me", &[("x-trace", "1")]));
    let b = LiveNoiseCache::key(&request("GET", "/me", &[("x-trace", "2")]));
    assert!(a.is_some());
    assert_eq!(a, b);

    let ada = LiveNoiseCache::key(&request("GET", "/me", &[("authorization", "Bearer ada")]));
    assert_ne!(a, ada);
    assert_ne!(a, LiveNoiseCache::key(&request("GET", "/me?x", &[])));
    assert_eq!(LiveNoiseCache::key(&request("POST", "/me", &[])), None);
}

#[test]
fn live_noise_cache_returns_the_previous_answer_and_stays_within_its_bytes() {
    let mut cache = LiveNoiseCache::new(64 * 1024);
    assert_eq!(cache.swap(1, &answer("first")), None);
    assert_eq!(cache.swap(1, &answer("second")).unwrap().body, "first");

    for key in 2..1000 {
        cache.swap(key, &answer(&"x".repeat(500)));
    }
    assert!(cache.used_bytes() <= 64 * 1024, "{}", cache.used_bytes());
    assert!(cache.len() < 1000);
    // The oldest went first; the newest is kept.
    assert_eq!(cache.swap(1, &answer("again")), None);
    assert!(cache.swap(999, &answer("again")).is_some());

    // An answer too big for its share is not kept.
    cache.swap(5000, &answer(&"y".repeat(20 * 1024)));
    assert_eq!(cache.swap(5000, &answer("small")), None);
}
