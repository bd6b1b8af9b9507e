use std::time::Duration;

use super::*;

const MINIMAL: &str = "specter:\n  shadow_target: http://127.0.0.1:8082\n";

fn error_of(text: &str) -> String {
    match Config::parse(text, "test.yaml").and_then(|c| c.validate("test.yaml")) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn defaults_apply_to_a_minimal_config() {
    let validated = Config::parse(MINIMAL, "t").unwrap().validate("t").unwrap();
    let config = &validated.config;
    assert_eq!(config.sampling.rate, 1.0);
    assert!(!config.sampling.divergence_only);
    assert_eq!(validated.replay_methods, ["GET", "HEAD", "OPTIONS"]);
    assert_eq!(config.replay.timeout, Duration::from_secs(10));
    assert_eq!(config.capture.max_body_bytes, 1024 * 1024);
    assert_eq!(config.store.path, PathBuf::from("./data/specter.redb"));
    assert_eq!(config.store.max_events, 100_000);
    assert_eq!(config.api.listen, "127.0.0.1:9090".parse().unwrap());
    assert!(config.cluster.is_none());
}

#[test]
fn unknown_key_is_named_with_its_section() {
    let message = error_of("specter:\n  shadow_target: http://a:1\nsampling:\n  rat: 0.5\n");
    assert!(message.contains("sampling"), "{message}");
    assert!(message.contains("rat"), "{message}");
}

#[test]
fn wrong_type_names_the_key_and_the_value() {
    let message = error_of("specter:\n  shadow_target: http://a:1\nreplay:\n  timeout: fast\n");
    assert!(message.contains("replay.timeout"), "{message}");
}

#[test]
fn out_of_range_rate_names_key_value_and_range() {
    let message = error_of("specter:\n  shadow_target: http://a:1\nsampling:\n  rate: 2.0\n");
    assert!(message.contains("sampling.rate"), "{message}");
    assert!(message.contains('2'), "{message}");
    assert!(message.contains("0.0 to 1.0"), "{message}");
}

#[test]
fn missing_shadow_target_is_an_error() {
    let message = error_of("sampling:\n  rate: 0.5\n");
    assert!(message.contains("specter.shadow_target"), "{message}");
}

#[test]
fn tls_target_is_refused_with_the_reason() {
    let message = error_of("specter:\n  shadow_target: https://a:443\n");
    assert!(
        message.contains("specter.shadow_target") && message.contains("TLS"),
        "{message}"
    );
}

#[test]
fn invalid_method_is_refused() {
    let message =
        error_of("specter:\n  shadow_target: http://a:1\nreplay:\n  methods: [GET, 'P OST']\n");
    assert!(
        message.contains("replay.methods") && message.contains("P OST"),
        "{message}"
    );
}

#[test]
fn methods_are_upper_cased_and_routing_key_lower_cased() {
    let text = "specter:\n  shadow_target: http://a:1\n  routing_key: X-User-ID\nreplay:\n  methods: [get, post]\n";
    let validated = Config::parse(text, "t").unwrap().validate("t").unwrap();
    assert_eq!(validated.replay_methods, ["GET", "POST"]);
    assert_eq!(validated.routing_key.as_deref(), Some("x-user-id"));
}

#[test]
fn target_keeps_its_path_prefix_and_default_port() {
    let target = Target::parse("k", "http://shadow.internal/v2/", "t").unwrap();
    assert_eq!(target.authority, "shadow.internal:80");
    assert_eq!(target.place("/users/1?x=2"), "/v2/users/1?x=2");

    let bare = Target::parse("k", "http://127.0.0.1:8082", "t").unwrap();
    assert_eq!(bare.place("/a"), "/a");
}

#[test]
fn proxy_mode_names_its_missing_keys() {
    let validated = Config::parse(MINIMAL, "t").unwrap().validate("t").unwrap();
    let message = validated.proxy_endpoints().unwrap_err().to_string();
    assert!(message.contains("specter.listen"), "{message}");
}

#[test]
fn example_configs_in_the_repository_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked > 0, "no example configs found in {}", dir.display());
}
