use std::time::SystemTime;

use bytes::Bytes;

use super::*;
use crate::{
    config::Config,
    exchange::{Headers, Request, Response, Source, Timing},
};

fn exchange(method: &str, key: Option<&str>, quality: Quality) -> Exchange {
    Exchange {
        source: Source::Proxy,
        client: None,
        request: Request {
            method: method.into(),
            target: "/users/1".into(),
            version: 1,
            headers: Headers::default(),
            body: Bytes::new(),
        },
        response: Response {
            status: 200,
            headers: Headers::default(),
            body: Bytes::new(),
        },
        timing: Timing {
            started: SystemTime::now(),
            live_latency: Duration::from_millis(1),
        },
        routing_key: key.map(str::to_owned),
        quality,
    }
}

/// A pipeline whose shadow is a port that accepts connections and never answers.
async fn start(extra: &str) -> (Running, tempfile::TempDir, tokio::net::TcpListener) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "specter:\n  shadow_target: http://{}\nstore:\n  path: {}\n{extra}",
        silent.local_addr().unwrap(),
        dir.path().join("s.redb").display()
    );
    let config = Config::parse(&text, "t").unwrap().validate("t").unwrap();
    let store = crate::store::open(&config.config.store, &config.node_name).unwrap();
    (
        Pipeline::start(&config, store, Arc::new(Profile::new()), None, None),
        dir,
        silent,
    )
}

#[test]
fn keyed_sampling_is_stable_per_key() {
    let sampler = Sampler::new(0.5);
    let mut kept = 0;
    for i in 0..1000 {
        let key = format!("user-{i}");
        let first = sampler.keep(Some(&key));
        assert!(
            (0..5).all(|_| sampler.keep(Some(&key)) == first),
            "key {key} flipped"
        );
        kept += usize::from(first);
    }
    assert!(
        (350..650).contains(&kept),
        "kept {kept} of 1000 at rate 0.5"
    );
}

#[test]
fn rate_bounds_keep_all_or_nothing() {
    assert!((0..100).all(|_| Sampler::new(1.0).keep(None)));
    assert!((0..100).all(|_| !Sampler::new(0.0).keep(Some("k"))));
}

#[tokio::test(flavor = "current_thread")]
async fn exchanges_that_cannot_be_mirrored_are_counted_with_their_reason() {
    let (running, _dir, _silent) = start("").await;
    let pipeline = running.pipeline().clone();

    pipeline.submit(exchange("GET", None, Quality::Truncated));
    pipeline.submit(exchange("GET", None, Quality::Incomplete));
    pipeline.submit(exchange("POST", None, Quality::Complete));
    pipeline.submit(exchange("DELETE", None, Quality::Complete));

    let c = pipeline.profile().counters();
    assert_eq!(c.seen, 4);
    assert_eq!((c.truncated, c.incomplete, c.skipped_unsafe), (1, 1, 2));
    assert_eq!(c.mirrored + c.shadow_dropped, 0);
    running.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_full_replay_queue_drops_and_counts_without_blocking() {
    let (running, _dir, _silent) = start("replay:\n  concurrency: 1\n  queue_size: 2\n").await;
    let pipeline = running.pipeline().clone();

    // The lane task cannot run before this function yields, so the queue fills exactly.
    for _ in 0..10 {
        pipeline.submit(exchange("GET", Some("user-1"), Quality::Complete));
    }
    let c = pipeline.profile().counters();
    assert_eq!(c.seen, 10);
    assert_eq!(c.shadow_dropped, 8);
    running.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn sampled_out_exchanges_never_reach_the_queue() {
    let (running, _dir, _silent) = start("sampling:\n  rate: 0.0\n").await;
    let pipeline = running.pipeline().clone();
    for i in 0..20 {
        pipeline.submit(exchange("GET", Some(&format!("k{i}")), Quality::Complete));
    }
    let c = pipeline.profile().counters();
    assert_eq!((c.seen, c.sampled_out, c.shadow_dropped), (20, 20, 0));
    running.shutdown(Duration::from_millis(100)).await;
}
