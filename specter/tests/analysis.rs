//! Divergence analysis end to end: noise learning, routes and the verdict, on the real
//! `specter` binary in front of real test servers.
//!
//! The test server's `/noise` endpoint answers a fresh random `request_id` and the current time
//! on every request, on both sides, and the shadow also changes `value` (42 to 43). Each test
//! checks what a user reads from the admin API (or from `specter verdict`) after driving traffic
//! through the proxy: the noise is recognised as noise, the real difference is not, and the
//! figures add up. The processes come from `support/harness.rs`.

#[path = "support/harness.rs"]
mod harness;

use std::{
    thread,
    time::{Duration, Instant},
};

use reqwest::blocking::Client;
use serde_json::Value;
use tempfile::TempDir;

use harness::{ProxyConfig, Specter, TestServer, client, counter, run_cli, wait_until};

/// How long warm-up may take: tests share two cores with other test binaries.
const WARM_UP_DEADLINE: Duration = Duration::from_secs(60);

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("create a test directory")
}

/// Percent-encodes a route as the one path segment the API expects.
fn encode_route(route: &str) -> String {
    route
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn get_ok(client: &Client, url: &str) {
    let response = client
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(
        response.status().is_success() || response.status() == 404,
        "GET {url} answered {}",
        response.status()
    );
}

/// Sends `count` GETs of `path` through the proxy and waits until all were mirrored.
fn drive(specter: &Specter, client: &Client, path: &str, count: u64) {
    let before = counter(&specter.stats(), "mirrored");
    for _ in 0..count {
        get_ok(client, &specter.url(path));
    }
    wait_until("the requests to be mirrored", WARM_UP_DEADLINE, || {
        (counter(&specter.stats(), "mirrored") >= before + count).then_some(())
    });
}

/// The classification of each field of `route`, by path.
fn classifications(specter: &Specter, route: &str) -> Vec<(String, String)> {
    let fields = specter.api_json(&format!("/api/routes/{}/fields", encode_route(route)));
    fields["fields"]
        .as_array()
        .expect("a fields array")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap_or_default().to_owned(),
                f["classification"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn class_of<'a>(fields: &'a [(String, String)], path: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, c)| c.as_str())
}

/// Drives `/noise` until its three body fields are classified, and returns the fields.
fn warm_up_noise(specter: &Specter, client: &Client) -> Vec<(String, String)> {
    let started = Instant::now();
    loop {
        drive(specter, client, "/noise", 10);
        let fields = classifications(specter, "GET /noise");
        let settled = class_of(&fields, "/request_id") == Some("noise")
            && class_of(&fields, "/generated_at") == Some("noise")
            && class_of(&fields, "/value") == Some("divergence");
        if settled {
            return fields;
        }
        assert!(
            started.elapsed() < WARM_UP_DEADLINE,
            "fields of GET /noise not classified after {WARM_UP_DEADLINE:?}: {fields:?}\n{:#}",
            specter.api_json("/api/routes")
        );
    }
}

/// The stored divergences of `GET /noise`, once every mirrored exchange of it is stored (each
/// one diverges, on `/value` at least).
fn stored_noise_events(specter: &Specter) -> Vec<Value> {
    let route_path = format!("/api/routes/{}", encode_route("GET /noise"));
    let list_path = format!(
        "/api/divergences?limit=1000&route={}",
        encode_route("GET /noise")
    );
    wait_until("every /noise event to be stored", WARM_UP_DEADLINE, || {
        let mirrored = specter.api_json(&route_path)["mirrored"].as_u64()?;
        let list = specter.api_json(&list_path)["divergences"]
            .as_array()?
            .clone();
        (list.len() as u64 == mirrored).then_some(list)
    })
}

/// After warm-up: a fresh `/noise` exchange counts `/value` only, with the noise stored beside
/// it and marked, and the route's figures add up.
fn assert_only_value_counts(specter: &Specter, client: &Client) {
    let route_path = format!("/api/routes/{}", encode_route("GET /noise"));
    let warm_up_events = stored_noise_events(specter);
    let last_warm_up_id = warm_up_events
        .iter()
        .filter_map(|e| e["id"].as_u64())
        .max()
        .unwrap_or(0);
    let before = specter.api_json(&route_path);
    drive(specter, client, "/noise", 5);
    let after = specter.api_json(&route_path);

    // Every exchange still diverges, because of `/value` and nothing else.
    let grew = |name: &str| after[name].as_u64().unwrap() - before[name].as_u64().unwrap();
    assert_eq!(grew("mirrored"), 5, "{after:#}");
    assert_eq!(grew("diverged"), 5, "{after:#}");
    assert_eq!(
        after["mirrored"].as_u64(),
        Some(
            after["matched"].as_u64().unwrap()
                + after["diverged"].as_u64().unwrap()
                + after["shadow_errors"].as_u64().unwrap()
        )
    );
    let top: Vec<&str> = after["top_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(top, ["/value"], "{after:#}");
    let noisy: Vec<&str> = after["noisy_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        noisy.contains(&"/request_id") && noisy.contains(&"/generated_at"),
        "{after:#}"
    );

    let fresh: Vec<Value> = stored_noise_events(specter)
        .into_iter()
        .filter(|e| e["id"].as_u64() > Some(last_warm_up_id))
        .collect();
    assert_eq!(fresh.len(), 5);
    for summary in &fresh {
        assert_eq!(summary["differences"], 1, "{summary:#}");
        assert_eq!(summary["paths"], serde_json::json!(["body:/value"]));
        // `generated_at` has millisecond resolution, so live and shadow may share it now and
        // then; `request_id` never.
        assert!(
            summary["noise_differences"].as_u64() >= Some(1),
            "{summary:#}"
        );

        let event = specter.api_json(&format!("/api/divergences/{}", summary["id"]));
        let flags: Vec<(String, bool)> = event["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["path"].as_str().unwrap().to_owned(),
                    d["noise"].as_bool().unwrap(),
                )
            })
            .collect();
        assert!(flags.contains(&("/value".to_owned(), false)), "{flags:?}");
        assert!(
            flags.contains(&("/request_id".to_owned(), true)),
            "{flags:?}"
        );
        assert!(
            !flags.contains(&("/generated_at".to_owned(), false)),
            "{flags:?}"
        );
    }
}

#[test]
fn noise_is_learned_from_a_secondary_copy_of_live() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let secondary = TestServer::live(dir.path());
    let config = ProxyConfig::new(live.url(), shadow.url())
        .specter_key(&format!("secondary_target: {}", secondary.url()))
        .section("compare:\n  min_samples: 20\n  min_noise_samples: 10");
    let specter = Specter::start(dir.path(), config);
    let client = client();

    let fields = warm_up_noise(&specter, &client);
    assert_eq!(class_of(&fields, "/value"), Some("divergence"));
    assert_only_value_counts(&specter, &client);

    // Every mirrored exchange went to the secondary too, counted apart from mirrored ones.
    let stats = specter.wait_for_stats("one secondary replay per mirrored exchange", |s| {
        counter(s, "noise_replays") == counter(s, "mirrored")
    });
    assert_eq!(stats["analysis"]["noise_learning"], "secondary");
    let noise = specter.api_json(&format!("/api/routes/{}", encode_route("GET /noise")));
    assert!(noise["noise_samples"]["secondary"].as_u64().unwrap() >= 10);
    assert_eq!(noise["noise_samples"]["shadow"], 0);
}

#[test]
fn noise_is_learned_from_traffic_without_a_secondary() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let config = ProxyConfig::new(live.url(), shadow.url())
        .section("compare:\n  min_samples: 20\n  min_noise_samples: 10\n  noise_sample_rate: 0.5");
    let specter = Specter::start(dir.path(), config);
    let client = client();

    let fields = warm_up_noise(&specter, &client);
    assert_eq!(class_of(&fields, "/value"), Some("divergence"));
    assert_only_value_counts(&specter, &client);

    // Both learned sources saw the route: the shadow replayed twice, and live repeats.
    let noise = specter.api_json(&format!("/api/routes/{}", encode_route("GET /noise")));
    assert!(
        noise["noise_samples"]["live"].as_u64().unwrap() >= 10,
        "{noise:#}"
    );
    assert!(
        noise["noise_samples"]["shadow"].as_u64().unwrap() > 0,
        "{noise:#}"
    );
    let stats = specter.stats();
    assert_eq!(stats["analysis"]["noise_learning"], "learned");
    let replays = counter(&stats, "noise_replays");
    assert!(
        replays > 0 && replays < counter(&stats, "mirrored"),
        "{stats:#}"
    );
}

#[test]
fn exchanges_that_differ_only_in_noise_count_as_matched_once_learned() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    // Leave the real difference out, so only noise remains.
    let config = ProxyConfig::new(live.url(), shadow.url()).section(
        "compare:\n  min_samples: 20\n  min_noise_samples: 10\n  noise_sample_rate: 0.5\n  \
         ignore:\n    - route: GET /noise\n      path: /value",
    );
    let specter = Specter::start(dir.path(), config);
    let client = client();
    let route_path = format!("/api/routes/{}", encode_route("GET /noise"));

    // Before the noise is learned its differences count: nothing matches yet.
    drive(&specter, &client, "/noise", 5);
    let early = specter.api_json(&route_path);
    assert_eq!(early["matched"], 0, "{early:#}");
    assert_eq!(early["fields"]["pending"], 2, "{early:#}");

    let started = Instant::now();
    loop {
        drive(&specter, &client, "/noise", 10);
        let fields = classifications(&specter, "GET /noise");
        if class_of(&fields, "/request_id") == Some("noise")
            && class_of(&fields, "/generated_at") == Some("noise")
        {
            break;
        }
        assert!(
            started.elapsed() < WARM_UP_DEADLINE,
            "noise not learned: {fields:?}"
        );
    }

    let before = specter.api_json(&route_path);
    drive(&specter, &client, "/noise", 10);
    let after = specter.api_json(&route_path);
    let grew = |name: &str| after[name].as_u64().unwrap() - before[name].as_u64().unwrap();
    assert_eq!((grew("matched"), grew("diverged")), (10, 0), "{after:#}");
}

#[test]
fn ids_share_a_route_and_random_paths_do_not_explode_the_routes() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let specter = Specter::start(dir.path(), ProxyConfig::new(live.url(), shadow.url()));

    let client = client();
    get_ok(&client, &specter.url("/users/123"));
    get_ok(&client, &specter.url("/users/456"));

    // Ten thousand distinct names that look like words, not ids, under one prefix.
    const PATHS: u64 = 10_000;
    const THREADS: u64 = 4;
    thread::scope(|scope| {
        for t in 0..THREADS {
            let specter = &specter;
            scope.spawn(move || {
                let client = harness::client();
                let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ (t + 1);
                for _ in 0..PATHS / THREADS {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let name: String = (0..10)
                        .map(|i| char::from(b'a' + ((seed >> (i * 6)) % 26) as u8))
                        .collect();
                    get_ok(&client, &specter.url(&format!("/catalog/{name}")));
                }
            });
        }
    });
    wait_until(
        "every request to be mirrored",
        Duration::from_secs(120),
        || (counter(&specter.stats(), "mirrored") >= PATHS + 2).then_some(()),
    );

    let routes = specter.api_json("/api/routes");
    let names: Vec<&str> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["route"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"GET /users/{id}"), "{names:?}");
    assert!(names.contains(&"GET /catalog/{id}"), "{names:?}");
    assert!(
        names.len() <= 3,
        "{} routes: {:?}",
        names.len(),
        &names[..names.len().min(10)]
    );
    let users = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "GET /users/{id}")
        .unwrap();
    assert_eq!(users["mirrored"], 2);
    let catalog = specter.api_json(&format!(
        "/api/routes/{}",
        encode_route("GET /catalog/{id}")
    ));
    assert_eq!(catalog["mirrored"], PATHS, "{catalog:#}");
    assert_eq!(catalog["status_matrix"]["404"]["404"], PATHS, "{catalog:#}");
}

/// `specter verdict` against this node with `extra` options.
fn verdict(specter: &Specter, extra: &[&str]) -> harness::CliRun {
    let api = format!("http://{}", specter.api);
    let mut args = vec!["verdict", "--api", api.as_str()];
    args.extend_from_slice(extra);
    run_cli(&args, Duration::from_secs(30))
}

#[test]
fn verdict_exits_0_on_pass_1_on_fail_and_2_without_enough_evidence() {
    let dir = tempdir();
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let config = ProxyConfig::new(live.url(), shadow.url())
        .section("compare:\n  min_samples: 20\n  min_noise_samples: 5\n  noise_sample_rate: 0.5");
    let specter = Specter::start(dir.path(), config);
    let client = client();
    // Localhost latencies are fractions of a millisecond: judge matching, not timing.
    let lenient = ["--min-samples", "20", "--max-latency-ratio", "1000"];

    // Nothing mirrored yet: not enough evidence.
    let run = verdict(&specter, &lenient);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stdout.contains("verdict: insufficient evidence"),
        "{run:?}"
    );

    // An identical endpoint: passes once it has its samples.
    drive(&specter, &client, "/users/7", 25);
    let run = verdict(&specter, &lenient);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("GET /users/{id}"), "{run:?}");
    assert!(run.stdout.contains("verdict: pass"), "{run:?}");

    // Asking for more samples than there are: not enough evidence again.
    let run = verdict(
        &specter,
        &["--min-samples", "1000", "--max-latency-ratio", "1000"],
    );
    assert_eq!(run.code, Some(2), "{run:?}");

    // `/orders/{id}` changes `/total`: once that field is classified, the shadow fails.
    let orders = "GET /orders/{id}";
    let started = Instant::now();
    loop {
        drive(&specter, &client, "/orders/12", 10);
        if class_of(&classifications(&specter, orders), "/total") == Some("divergence") {
            break;
        }
        assert!(
            started.elapsed() < WARM_UP_DEADLINE,
            "/total never classified"
        );
    }
    let run = verdict(&specter, &lenient);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.contains("GET /orders/{id}"), "{run:?}");
    assert!(run.stdout.contains("match rate"), "{run:?}");
    assert!(run.stdout.contains("verdict: fail"), "{run:?}");

    // The API gives the same answer.
    let api = specter.api_json("/api/verdict?min_samples=20&max_latency_ratio=1000");
    assert_eq!(api["verdict"], "fail");
    let by_route: Vec<(&str, &str)> = api["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["route"].as_str().unwrap(), r["verdict"].as_str().unwrap()))
        .collect();
    assert!(
        by_route.contains(&("GET /users/{id}", "pass")),
        "{by_route:?}"
    );
    assert!(by_route.contains(&(orders, "fail")), "{by_route:?}");

    // A node that cannot be reached gives no verdict at all, never a pass.
    let run = run_cli(
        &[
            "verdict",
            "--api",
            &format!("http://{}", harness::closed_addr()),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(3), "{run:?}");
}
