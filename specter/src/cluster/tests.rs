use std::time::SystemTime;

use bytes::Bytes;

use super::*;
use crate::{
    config::Config,
    exchange::{Headers, Quality, Request, Response, Source, Timing},
};

fn exchange() -> Exchange {
    Exchange {
        source: Source::Attach,
        client: Some("[fd00::7]:51000".parse().unwrap()),
        request: Request {
            method: "POST".into(),
            target: "/upload?x=1".into(),
            version: 0,
            headers: Headers(vec![
                ("host".into(), Bytes::from_static(b"live")),
                ("x-a".into(), Bytes::from_static(b"1")),
                ("x-a".into(), Bytes::from_static(b"\xff\x00binary")),
            ]),
            body: Bytes::from_static(b"\x00\x01 body"),
        },
        response: Response {
            status: 503,
            headers: Headers(vec![("retry-after".into(), Bytes::from_static(b"5"))]),
            body: Bytes::from(vec![7u8; 10_000]),
        },
        timing: Timing {
            started: SystemTime::UNIX_EPOCH,
            live_latency: Duration::from_micros(1234),
        },
        routing_key: Some("user-ü".into()),
        quality: Quality::Truncated,
    }
}

#[test]
fn a_job_decodes_to_the_exchange_it_was_made_from() {
    let mut original = exchange();
    original.timing.started = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
    let decoded = job::decode(job::encode(&original)).expect("decodes");

    assert_eq!(decoded.source, original.source);
    assert_eq!(decoded.client, original.client);
    assert_eq!(decoded.request, original.request);
    assert_eq!(decoded.response, original.response);
    assert_eq!(decoded.timing, original.timing);
    assert_eq!(decoded.routing_key, original.routing_key);
    assert_eq!(decoded.quality, original.quality);
}

#[test]
fn a_cut_or_altered_job_is_an_error_not_a_panic() {
    let encoded = job::encode(&exchange());
    for len in 0..encoded.len() {
        assert!(job::decode(encoded.slice(..len)).is_err(), "cut at {len}");
    }

    let mut versioned = encoded.to_vec();
    versioned[0] = 9;
    assert_eq!(
        job::decode(Bytes::from(versioned)).unwrap_err(),
        job::JobError::Version(9)
    );

    let mut longer = encoded.to_vec();
    longer.push(0);
    assert!(job::decode(Bytes::from(longer)).is_err());

    // Flipping any byte either fails to decode or decodes to something; it never panics.
    for at in 0..encoded.len().min(400) {
        let mut flipped = encoded.to_vec();
        flipped[at] ^= 0xff;
        let _ = job::decode(Bytes::from(flipped));
    }
}

#[test]
fn each_use_of_the_secret_gets_its_own_key() {
    let a = Keys::derive(b"correct horse");
    let b = Keys::derive(b"correct horse");
    let c = Keys::derive(b"correct horsf");
    assert_eq!(a.gossip, b.gossip);
    assert_eq!(a.forward, b.forward);
    assert_ne!(a.gossip, a.forward);
    assert_ne!(a.gossip, c.gossip);
    assert_ne!(a.forward, c.forward);
}

#[test]
fn divergences_from_several_nodes_merge_newest_first_with_their_node() {
    let list = |entries: &[(u64, u64)]| -> Vec<serde_json::Value> {
        entries
            .iter()
            .map(|(id, time)| serde_json::json!({ "id": id, "time_ms": time }))
            .collect()
    };
    let merged = merge_divergences(
        vec![
            ("a".into(), list(&[(2, 300), (1, 100)])),
            ("b".into(), list(&[(9, 200)])),
        ],
        2,
    );
    assert_eq!(
        merged,
        vec![
            serde_json::json!({ "id": 2, "time_ms": 300, "node": "a" }),
            serde_json::json!({ "id": 9, "time_ms": 200, "node": "b" }),
        ]
    );
}

fn validate(yaml: &str) -> Result<Validated, crate::config::ConfigError> {
    let text = format!("specter:\n  shadow_target: http://127.0.0.1:9\n{yaml}");
    Config::parse(&text, "test")?.validate("test")
}

fn rejected_key(yaml: &str) -> String {
    match validate(yaml) {
        Err(crate::config::ConfigError::Invalid { key, .. }) => key,
        other => panic!("expected a rejected key, got {other:?}"),
    }
}

#[test]
fn cluster_config_defaults_and_derived_forward_address() {
    let validated = validate(
        "api:\n  listen: 10.0.0.1:9090\ncluster:\n  node_name: a\n  bind_addr: 10.0.0.1:7946\n  \
         secret_file: /etc/secret\n",
    )
    .expect("valid");
    let cluster = validated.config.cluster.expect("section");
    assert_eq!(cluster.vnodes, DEFAULT_VNODES);
    assert_eq!(cluster.forward_listen(), "10.0.0.1:7947".parse().unwrap());
    assert_eq!(validated.node_name, "a");
}

#[test]
fn cluster_config_errors_name_the_key() {
    let base = "cluster:\n  secret_file: /etc/secret\n";
    assert_eq!(
        rejected_key(&format!("{base}  bind_addr: 0.0.0.0:7946\n")),
        "cluster.advertise_addr"
    );
    assert_eq!(
        rejected_key(&format!("{base}  bind_addr: 10.0.0.1:0\n")),
        "cluster.bind_addr"
    );
    assert_eq!(
        rejected_key(&format!(
            "{base}  bind_addr: 10.0.0.1:7946\n  peers: [\"10.0.0.2\"]\n"
        )),
        "cluster.peers"
    );
    assert_eq!(
        rejected_key(&format!("{base}  bind_addr: 10.0.0.1:7946\n  vnodes: 0\n")),
        "cluster.vnodes"
    );
    assert_eq!(
        rejected_key(&format!(
            "{base}  bind_addr: 10.0.0.1:7946\n  node_name: \"a b\"\n"
        )),
        "cluster.node_name"
    );
    assert_eq!(
        rejected_key(&format!(
            "{base}  bind_addr: 10.0.0.1:7946\n  forward_addr: 10.0.0.1:7946\n"
        )),
        "cluster.forward_addr"
    );
    // The other members could not read this node's figures on loopback.
    assert_eq!(
        rejected_key(&format!("{base}  bind_addr: 10.0.0.1:7946\n")),
        "api.listen"
    );
    // A cluster all on loopback (one host) is fine.
    validate(&format!("{base}  bind_addr: 127.0.0.1:7946\n")).expect("valid on one host");
    if std::env::var_os(CLUSTER_SECRET_ENV).is_none() {
        assert_eq!(
            rejected_key("cluster:\n  bind_addr: 10.0.0.1:7946\n"),
            "cluster.secret_file"
        );
    }
}

#[test]
fn the_routing_key_decides_the_owner_else_the_client_ip() {
    let mut keyed = exchange();
    assert_eq!(ownership_key(&keyed).as_deref(), Some("user-ü"));

    keyed.routing_key = None;
    assert_eq!(ownership_key(&keyed).as_deref(), Some("fd00::7"));
    let mut other_port = keyed.clone();
    other_port.client = Some("[fd00::7]:40000".parse().unwrap());
    assert_eq!(ownership_key(&keyed), ownership_key(&other_port));

    keyed.client = None;
    assert_eq!(ownership_key(&keyed), None);
}
