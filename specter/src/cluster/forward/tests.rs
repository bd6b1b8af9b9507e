use std::{sync::Mutex as StdMutex, time::SystemTime};

use super::*;
use crate::exchange::{Headers, Quality, Request, Response, Source, Timing};

fn exchange(n: usize, body: usize) -> Exchange {
    Exchange {
        source: Source::Proxy,
        client: Some(SocketAddr::from(([10, 0, 0, 9], 40000))),
        request: Request {
            method: "GET".into(),
            target: format!("/orders/{n}"),
            version: 1,
            headers: Headers(vec![("x-user-id".into(), Bytes::from_static(b"ada"))]),
            body: Bytes::new(),
        },
        response: Response {
            status: 200,
            headers: Headers::default(),
            body: Bytes::from(vec![b'x'; body]),
        },
        timing: Timing {
            started: SystemTime::now(),
            live_latency: Duration::from_millis(3),
        },
        routing_key: Some("ada".into()),
        quality: Quality::Complete,
    }
}

/// Records what the links report.
#[derive(Default)]
struct Recorded {
    acknowledged: AtomicCount,
    unconfirmed: AtomicCount,
    not_shipped: StdMutex<Vec<String>>,
}

#[derive(Default)]
struct AtomicCount(std::sync::atomic::AtomicUsize);

impl AtomicCount {
    fn add(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Outcome for Recorded {
    fn acknowledged(&self) {
        self.acknowledged.add();
    }

    fn unconfirmed(&self) {
        self.unconfirmed.add();
    }

    fn not_shipped(&self, exchange: Exchange) {
        self.not_shipped
            .lock()
            .unwrap()
            .push(exchange.request.target);
    }
}

/// An owner on loopback that keeps the targets of the jobs it takes.
struct Owner {
    addr: SocketAddr,
    taken: Arc<StdMutex<Vec<String>>>,
    _stop: watch::Sender<bool>,
}

async fn owner(key: [u8; 32], max_frame: usize) -> Owner {
    let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let taken = Arc::new(StdMutex::new(Vec::new()));
    let deliver: Deliver = {
        let taken = taken.clone();
        Arc::new(move |exchange: Exchange| taken.lock().unwrap().push(exchange.request.target))
    };
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        ForwardKey::new(key),
        max_frame,
        deliver,
        stop_rx,
    ));
    Owner {
        addr,
        taken,
        _stop: stop,
    }
}

async fn settle(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_reach_the_owner_in_order_and_are_acknowledged() {
    let owner = owner([7; 32], 1 << 20).await;
    let outcome = Arc::new(Recorded::default());
    let forwarder = Forwarder::new(ForwardKey::new([7; 32]), 1 << 20, outcome.clone());

    for n in 0..200 {
        assert!(
            forwarder
                .ship("owner", owner.addr, exchange(n, n * 10))
                .is_none(),
            "queue has room"
        );
    }
    settle("200 acknowledgements", || outcome.acknowledged.get() == 200).await;

    let expected: Vec<String> = (0..200).map(|n| format!("/orders/{n}")).collect();
    assert_eq!(*owner.taken.lock().unwrap(), expected);
    assert_eq!(outcome.unconfirmed.get(), 0);
    assert!(outcome.not_shipped.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_secret_is_refused() {
    let owner = owner([7; 32], 1 << 20).await;
    let outcome = Arc::new(Recorded::default());
    let forwarder = Forwarder::new(ForwardKey::new([8; 32]), 1 << 20, outcome.clone());

    assert!(
        forwarder
            .ship("owner", owner.addr, exchange(1, 10))
            .is_none(),
        "queue has room"
    );
    settle("the job handed back", || {
        outcome.not_shipped.lock().unwrap().len() == 1
    })
    .await;
    assert!(owner.taken.lock().unwrap().is_empty());
    assert_eq!(outcome.acknowledged.get(), 0);
}

/// A client that skips the server's proof and sends frames under its own key is cut off at the
/// first frame: the owner checks every frame's MAC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_with_a_wrong_mac_are_never_delivered() {
    let owner = owner([7; 32], 1 << 20).await;
    let mut stream = TcpStream::connect(owner.addr).await.unwrap();
    let mut hello = CLIENT_MAGIC.to_vec();
    hello.extend_from_slice(&[1; NONCE_LEN]);
    stream.write_all(&hello).await.unwrap();
    let mut answer = [0u8; 8 + NONCE_LEN + MAC_LEN];
    stream.read_exact(&mut answer).await.unwrap();

    let mut session = [0u8; 2 * NONCE_LEN];
    session[..NONCE_LEN].copy_from_slice(&[1; NONCE_LEN]);
    session[NONCE_LEN..].copy_from_slice(&answer[8..8 + NONCE_LEN]);
    let forged = frame(
        &ForwardKey::new([9; 32]),
        &session,
        0,
        &job::encode(&exchange(1, 5)),
    );
    stream.write_all(&forged).await.unwrap();

    let mut ack = [0u8; 1];
    let read = timeout(Duration::from_secs(5), stream.read(&mut ack)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the owner closes the connection"
    );
    assert!(owner.taken.lock().unwrap().is_empty());
}

/// A frame replayed on another connection carries the old session's MAC and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_cannot_be_replayed_on_another_connection() {
    let owner = owner([7; 32], 1 << 20).await;
    let key = ForwardKey::new([7; 32]);
    let old_session = [3u8; 2 * NONCE_LEN];
    let replayed = frame(&key, &old_session, 0, &job::encode(&exchange(1, 5)));

    let mut stream = TcpStream::connect(owner.addr).await.unwrap();
    let mut hello = CLIENT_MAGIC.to_vec();
    hello.extend_from_slice(&[3; NONCE_LEN]);
    stream.write_all(&hello).await.unwrap();
    let mut answer = [0u8; 8 + NONCE_LEN + MAC_LEN];
    stream.read_exact(&mut answer).await.unwrap();
    stream.write_all(&replayed).await.unwrap();

    let mut ack = [0u8; 1];
    let read = timeout(Duration::from_secs(5), stream.read(&mut ack)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))));
    assert!(owner.taken.lock().unwrap().is_empty());
}

/// The owner refuses a frame above its cap without reading it; the sender never ships a job
/// above its own cap and handles it locally instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_above_the_cap_are_refused() {
    let owner = owner([7; 32], 4096).await;

    let outcome = Arc::new(Recorded::default());
    let forwarder = Forwarder::new(ForwardKey::new([7; 32]), 4096, outcome.clone());
    assert!(
        forwarder
            .ship("owner", owner.addr, exchange(1, 100_000))
            .is_none(),
        "queue has room"
    );
    assert!(
        forwarder
            .ship("owner", owner.addr, exchange(2, 10))
            .is_none(),
        "queue has room"
    );
    settle("the small job acknowledged", || {
        outcome.acknowledged.get() == 1
    })
    .await;
    assert_eq!(*outcome.not_shipped.lock().unwrap(), vec!["/orders/1"]);
    assert_eq!(*owner.taken.lock().unwrap(), vec!["/orders/2"]);

    // A sender with a larger cap than the owner's is cut off at the oversized frame.
    let outcome = Arc::new(Recorded::default());
    let forwarder = Forwarder::new(ForwardKey::new([7; 32]), 1 << 20, outcome.clone());
    assert!(
        forwarder
            .ship("owner", owner.addr, exchange(3, 100_000))
            .is_none(),
        "queue has room"
    );
    settle("the oversized job unconfirmed", || {
        outcome.unconfirmed.get() == 1
    })
    .await;
    assert_eq!(*owner.taken.lock().unwrap(), vec!["/orders/2"]);
}

/// While the owner is down, its jobs come back for local handling; once it is up again they
/// are shipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_owner_hands_jobs_back_then_recovers() {
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = spare.local_addr().unwrap();
    drop(spare);

    let outcome = Arc::new(Recorded::default());
    let forwarder = Forwarder::new(ForwardKey::new([7; 32]), 1 << 20, outcome.clone());
    for n in 0..3 {
        assert!(
            forwarder.ship("owner", addr, exchange(n, 1)).is_none(),
            "queue has room"
        );
    }
    settle("three jobs handed back", || {
        outcome.not_shipped.lock().unwrap().len() == 3
    })
    .await;

    let listener = bind(addr).await.unwrap();
    let taken = Arc::new(StdMutex::new(Vec::new()));
    let deliver: Deliver = {
        let taken = taken.clone();
        Arc::new(move |exchange: Exchange| taken.lock().unwrap().push(exchange.request.target))
    };
    let (_stop, stop_rx) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        ForwardKey::new([7; 32]),
        1 << 20,
        deliver,
        stop_rx,
    ));

    // The link waits RETRY_AFTER before connecting again; jobs meanwhile are handled locally.
    let started = Instant::now();
    let mut n = 10;
    while outcome.acknowledged.get() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the link never recovered"
        );
        let _ = forwarder.ship("owner", addr, exchange(n, 1));
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!taken.lock().unwrap().is_empty());
}
