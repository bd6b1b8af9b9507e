use std::{io::Write as _, time::Instant};

use flate2::{Compression, write::GzEncoder};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use super::*;
use crate::testserver::{self, Mode};

/// A live-mode test server on an ephemeral port, stopped when dropped.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    async fn start() -> Server {
        let listener = testserver::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(testserver::serve(listener, Mode::Live, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn full_plan(addr: SocketAddr, requests: usize, connections: usize) -> Plan {
    Plan {
        requests,
        connections,
        users: 20,
        mix: Mix::Full,
        seed: 7,
        ..Plan::new(addr)
    }
}

/// A request for the raw client, built by hand.
fn planned(seq: usize, method: &'static str, target: &str) -> PlannedRequest {
    PlannedRequest {
        seq,
        connection: 0,
        method,
        target: target.to_owned(),
        user: "user-0".to_owned(),
        headers: vec![("host", "test".to_owned())],
        body: Bytes::new(),
        expect_continue: false,
    }
}

/// The body the live test server answers `record`'s request with, where it is predictable.
fn expected_body(record: &ClientRecord) -> Option<Vec<u8>> {
    if record.method == "HEAD" {
        return Some(Vec::new());
    }
    let (path, query) = record
        .target
        .split_once('?')
        .unwrap_or((&record.target, ""));
    let param = query.split_once('=').map(|(_, value)| value);
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let body = match segments.as_slice() {
        ["profile"] => {
            br#"{"id":1,"name":"Ada Lovelace","email":"ada@example.com","plan":"pro"}"#.to_vec()
        }
        ["users", id] => {
            format!(r#"{{"id":{id},"name":"user-{id}","active":true,"roles":["reader"]}}"#)
                .into_bytes()
        }
        ["orders", id] => serde_json::to_vec(&json!({
            "order_id": id.parse::<u64>().unwrap(),
            "items": [{"sku": "A-1", "qty": 2, "price": 9.5}],
            "total": 19.0,
            "currency": "EUR",
        }))
        .unwrap(),
        ["gzip"] => {
            let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
            encoder
                .write_all(br#"{"compressed":true,"items":[1,2,3],"message":"hello"}"#)
                .unwrap();
            encoder.finish().unwrap()
        }
        ["chunked"] => concat!(
            r#"{"chunked":true,"parts":["alpha","beta","gamma"],"#,
            r#""note":"sent in pieces by live, whole by shadow","count":3}"#
        )
        .as_bytes()
        .to_vec(),
        ["status", "204" | "304"] => Vec::new(),
        ["status", code] => format!(r#"{{"status":{code}}}"#).into_bytes(),
        ["echo"] => serde_json::to_vec(&json!({
            "method": record.method,
            "path": record.target,
            "headers": record.request_headers,
            "body": "",
            "body_len": 0,
        }))
        .unwrap(),
        ["slow"] => format!(r#"{{"slept_ms":{}}}"#, param.unwrap()).into_bytes(),
        ["big"] => {
            let len: usize = param.unwrap().parse().unwrap();
            let line = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-\n";
            line.iter().copied().cycle().take(len).collect()
        }
        ["upload"] => format!(
            r#"{{"received":{},"xxh3":"{}"}}"#,
            record.request_body_len, record.request_body_xxh3
        )
        .into_bytes(),
        _ => return None,
    };
    Some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mix_logs_every_exchange_exactly() {
    let server = Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("exchanges.jsonl");
    let plan = Plan {
        log: Some(log.clone()),
        ..full_plan(server.addr, 300, 12)
    };

    let started = Instant::now();
    let summary = run(plan.clone()).await.unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");

    let records: Vec<ClientRecord> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let seqs: Vec<usize> = records.iter().map(|record| record.seq).collect();
    assert_eq!(seqs, (0..300).collect::<Vec<_>>());
    assert_eq!((summary.sent, summary.failed), (300, 0));
    assert_eq!(summary.by_endpoint.values().sum::<usize>(), 300);

    let pipelined = records.iter().filter(|record| record.pipelined).count();
    let expect_continue = records.iter().filter(|r| r.expect_continue).count();
    assert!(pipelined > 0 && expect_continue > 0);
    assert_eq!(
        (summary.pipelined, summary.expect_continue),
        (pipelined, expect_continue)
    );

    let mut client_addrs = BTreeMap::new();
    for record in &records {
        let request = nth_request(&plan, record.seq);
        let context = format!("{record:?}");
        assert_eq!(record.method, request.method, "{context}");
        assert_eq!(record.target, request.target, "{context}");
        assert_eq!(record.user, request.user, "{context}");
        assert_eq!(record.connection, record.seq % 12, "{context}");
        let headers: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect();
        assert_eq!(record.request_headers, headers, "{context}");
        assert_eq!(record.request_body_len, request.body.len(), "{context}");
        assert_eq!(record.request_body_xxh3, hash(&request.body), "{context}");

        let interim: &[u16] = if record.expect_continue { &[100] } else { &[] };
        assert_eq!(record.interim_statuses, interim, "{context}");
        if record.pipelined {
            assert_ne!(plan.transport(record.connection), Transport::Hyper);
        }

        // No connection was reopened: the server keeps every one alive.
        let first = client_addrs
            .entry(record.connection)
            .or_insert(record.client_addr);
        assert_eq!(*first, record.client_addr, "{context}");

        if let Some(body) = expected_body(record) {
            assert_eq!(record.response_body_len, body.len(), "{context}");
            assert_eq!(record.response_body_xxh3, hash(&body), "{context}");
        } else {
            assert_eq!((record.target.as_str(), record.status), ("/noise", 200));
        }
        let status = match record.target.strip_prefix("/status/") {
            Some(code) => code.parse().unwrap(),
            None => 200,
        };
        assert_eq!(record.status, status, "{context}");
    }

    // The seed gives a mix that reaches every shape the capture tests depend on.
    let has = |test: &dyn Fn(&ClientRecord) -> bool| records.iter().any(test);
    assert!(has(
        &|r| r.target.starts_with("/big") && r.response_body_len >= 64 * KIB
    ));
    assert!(has(
        &|r| r.target.starts_with("/big") && r.response_body_len == 0
    ));
    assert!(has(&|r| r.request_body_len >= 64 * KIB && r.pipelined));
    assert!(has(&|r| r.request_body_len == 0 && r.method == "POST"));
    assert!(has(&|r| r.method == "PUT"));
    assert!(has(
        &|r| r.method == "HEAD" && r.target.starts_with("/chunked")
    ));
    assert!(has(&|r| r.target == "/gzip" && r.pipelined));
    assert!(has(&|r| r.target == "/chunked" && r.pipelined));
    assert!(has(&|r| r.status == 204));
    assert!(has(&|r| r.status == 304));
    assert!(has(&|r| r.target == "/echo" && r.pipelined));
}

#[tokio::test]
async fn basic_mix_sends_the_demo_requests_over_hyper() {
    let server = Server::start().await;
    let plan = Plan {
        requests: 40,
        connections: 4,
        uploads: true,
        ..Plan::new(server.addr)
    };

    let summary = run(plan).await.unwrap();

    assert_eq!((summary.sent, summary.failed), (40, 0));
    assert_eq!((summary.pipelined, summary.expect_continue), (0, 0));
    assert_eq!(summary.by_endpoint["POST /upload"], 4);
    assert_eq!(summary.by_endpoint["HEAD /users"], 4);
}

#[test]
fn the_full_mix_is_a_function_of_seed_and_seq() {
    let plan = Plan {
        seed: 3,
        ..full_plan("127.0.0.1:9".parse().unwrap(), 1000, 10)
    };
    let other_seed = Plan {
        seed: 4,
        ..plan.clone()
    };
    assert!((0..20).all(|seq| nth_request(&plan, seq) == nth_request(&plan, seq)));
    assert!((0..20).any(|seq| nth_request(&plan, seq) != nth_request(&other_seed, seq)));

    let mut lens = Vec::new();
    for seq in 0..1000 {
        let request = nth_request(&plan, seq);
        assert_eq!(request.headers[2], ("x-request-seq", seq.to_string()));
        assert_eq!(request.connection, seq % 10);
        if matches!(request.method, "POST" | "PUT") {
            let length = request
                .headers
                .iter()
                .find(|(name, _)| *name == "content-length");
            assert_eq!(length.unwrap().1, request.body.len().to_string());
            lens.push(request.body.len());
        }
        if request.expect_continue {
            assert!(!request.body.is_empty());
            assert_ne!(plan.transport(request.connection), Transport::Hyper);
        }
        if let Some(bytes) = request.target.strip_prefix("/big?bytes=") {
            lens.push(bytes.parse().unwrap());
        }
    }

    assert!(lens.iter().all(|&len| len <= 2 * MIB));
    assert!(lens.contains(&0) && lens.contains(&(2 * MIB)));
    let small = lens.iter().filter(|&&len| len <= KIB).count();
    let large = lens.iter().filter(|&&len| len >= 64 * KIB).count();
    assert!(small > large && large > 0, "{small} small, {large} large");

    // The cap applies to every size the mix draws.
    let capped = Plan {
        max_body_bytes: 100,
        ..plan.clone()
    };
    assert!((0..300).all(|seq| nth_request(&capped, seq).body.len() <= 100));
}

/// Accepts one connection, waits for `heads` request heads, then writes `script` a few bytes
/// at a time, so every parse of the raw client meets a response split across reads. Returns
/// everything the client wrote once it closes the connection.
async fn scripted_server(heads: usize, script: &'static [u8]) -> (SocketAddr, JoinHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        while received.windows(4).filter(|w| w == b"\r\n\r\n").count() < heads {
            let mut chunk = [0; 1024];
            let read = stream.read(&mut chunk).await.unwrap();
            assert_ne!(read, 0, "client closed early");
            received.extend_from_slice(&chunk[..read]);
        }
        for piece in script.chunks(7) {
            stream.write_all(piece).await.unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = stream.read_to_end(&mut received).await;
        received
    });
    (addr, task)
}

type JoinHandle = tokio::task::JoinHandle<Vec<u8>>;

#[tokio::test]
async fn raw_client_reads_pipelined_responses_split_across_reads() {
    let script: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
        HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-Trailer: yes\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n\
        HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbytes";
    let (addr, server) = scripted_server(4, script).await;
    let batch = [
        planned(0, "GET", "/a"),
        planned(1, "HEAD", "/b"),
        planned(2, "GET", "/c"),
        planned(3, "GET", "/d"),
    ];

    let mut raw = RawConnection::open(addr).await.unwrap();
    let (responses, error) = raw.exchange(&batch, Duration::from_secs(5)).await;
    drop(raw);

    assert_eq!(error, None);
    let seen: Vec<_> = responses
        .iter()
        .map(|r| {
            (
                r.interim_statuses.clone(),
                r.status,
                &r.body[..],
                r.keep_alive,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (vec![103], 200, &b"hello, world!!!"[..], true),
            (vec![], 200, &b""[..], true),
            (vec![], 304, &b""[..], true),
            (vec![], 200, &b"bytes"[..], false),
        ]
    );
    let received = server.await.unwrap();
    assert!(received.starts_with(b"GET /a HTTP/1.1\r\nhost: test\r\n\r\nHEAD /b HTTP/1.1\r\n"));
}

#[tokio::test]
async fn upload_refused_before_100_continue_sends_no_body() {
    let (addr, server) = scripted_server(
        1,
        b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let mut upload = planned(0, "POST", "/upload");
    upload.body = Bytes::from_static(b"never sent");
    upload.headers.push(("content-length", "10".to_owned()));
    upload.headers.push(("expect", "100-continue".to_owned()));
    upload.expect_continue = true;

    let mut raw = RawConnection::open(addr).await.unwrap();
    let (responses, error) = raw
        .exchange(&[upload.clone()], Duration::from_secs(5))
        .await;
    drop(raw);

    assert_eq!(error, None);
    assert_eq!(responses[0].status, 417);
    assert!(!responses[0].body_sent && !responses[0].keep_alive);
    let mut head = Vec::new();
    encode_head(&upload, &mut head);
    assert_eq!(server.await.unwrap(), head);
}

#[tokio::test]
async fn an_unanswered_request_fails_with_its_target_after_the_timeout() {
    // A server that reads requests and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            });
        }
    });
    let plan = Plan {
        timeout: Duration::from_millis(300),
        max_body_bytes: KIB,
        ..full_plan(addr, 4, 2)
    };

    let started = Instant::now();
    let error = run(plan.clone()).await.unwrap_err();

    assert!(started.elapsed() < Duration::from_secs(3));
    let TrafficError::Request { seq, target, .. } = &error else {
        panic!("unexpected error {error}");
    };
    assert_eq!(*target, nth_request(&plan, *seq).target);
    assert!(error.to_string().contains(target.as_str()), "{error}");
    assert!(error.to_string().contains("within 300ms"), "{error}");
}

#[test]
fn traffic_args_accept_the_demo_command_line_and_the_full_mix_flags() {
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        traffic: TrafficArgs,
    }
    <Cli as clap::CommandFactory>::command().debug_assert();

    let demo = Cli::try_parse_from([
        "traffic",
        "--target",
        "127.0.0.1:9000",
        "--requests",
        "5",
        "--connections",
        "16",
        "--users",
        "200",
        "--uploads",
    ])
    .unwrap()
    .traffic
    .plan();
    assert_eq!(demo.host, "127.0.0.1:9000");
    assert_eq!((demo.requests, demo.connections, demo.users), (5, 16, 200));
    assert!(demo.uploads);
    assert_eq!(demo.mix, Mix::Basic);
    assert_eq!(demo.timeout, Duration::from_secs(30));

    let full = Cli::try_parse_from([
        "traffic",
        "--target",
        "127.0.0.1:9000",
        "--host",
        "shop.example",
        "--mix",
        "full",
        "--pipeline-depth",
        "0",
        "--max-body-bytes",
        "1000",
        "--seed",
        "9",
        "--timeout-secs",
        "2",
        "--log",
        "/tmp/exchanges.jsonl",
    ])
    .unwrap()
    .traffic
    .plan();
    assert_eq!(full.host, "shop.example");
    assert_eq!(full.mix, Mix::Full);
    assert_eq!(full.pipeline_depth, 1, "a depth of 0 means no pipelining");
    assert_eq!((full.max_body_bytes, full.seed), (1000, 9));
    assert_eq!(full.timeout, Duration::from_secs(2));
    assert_eq!(full.log, Some(PathBuf::from("/tmp/exchanges.jsonl")));
}
