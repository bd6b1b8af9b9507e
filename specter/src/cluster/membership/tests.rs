//! Membership on loopback: real gossip between nodes in one process.

use super::*;

/// A port free for both TCP and UDP a moment ago.
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TCP");
        let port = tcp.local_addr().expect("address").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

async fn node(name: &str, key: [u8; 32], seeds: &[SocketAddr]) -> Membership {
    start(name, key, seeds, 128)
        .await
        .expect("membership starts")
}

async fn start(
    name: &str,
    key: [u8; 32],
    seeds: &[SocketAddr],
    vnodes: usize,
) -> Result<Membership, MembershipError> {
    let bind = SocketAddr::from(([127, 0, 0, 1], free_port()));
    Membership::start(MembershipSettings {
        node_name: name.to_owned(),
        bind,
        advertise: None,
        seeds: seeds.iter().map(ToString::to_string).collect(),
        key,
        meta: NodeMeta {
            api: SocketAddr::from(([127, 0, 0, 1], 9090)),
            forward: SocketAddr::from(([127, 0, 0, 1], bind.port())),
            vnodes,
        },
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_name_is_taken_does_not_start() {
    let key = [8; 32];
    let a = node("a", key, &[]).await;
    let b = node("b", key, &[a.local().gossip]).await;
    wait_for("join", Duration::from_secs(10), &a, &["a", "b"]).await;

    let error = start("b", key, &[a.local().gossip], 128)
        .await
        .err()
        .expect("a second b is refused");
    let message = error.to_string();
    assert!(message.contains("cluster.node_name \"b\""), "{message}");
    assert!(message.contains(&b.local().gossip.to_string()), "{message}");
    // The first b is still the member called b.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let members = a.members();
    let listed = members.iter().find(|m| m.name == "b").expect("b listed");
    assert_eq!(listed.gossip, b.local().gossip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_other_ring_points_is_not_let_in() {
    let key = [9; 32];
    let a = node("a", key, &[]).await;
    let b = node("b", key, &[a.local().gossip]).await;
    wait_for("join", Duration::from_secs(10), &a, &["a", "b"]).await;

    let error = start("c", key, &[a.local().gossip], 64)
        .await
        .err()
        .expect("a node with 64 points is refused");
    let message = error.to_string();
    assert!(message.contains("cluster.vnodes 128"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for m in [&a, &b] {
        assert_eq!(names(&m.members()), ["a", "b"]);
    }
}

fn names(members: &[Member]) -> Vec<String> {
    members.iter().map(|m| m.name.clone()).collect()
}

async fn wait_for(what: &str, within: Duration, membership: &Membership, expected: &[&str]) {
    let started = Instant::now();
    loop {
        let now = names(&membership.members());
        if now == expected {
            return;
        }
        assert!(
            started.elapsed() < within,
            "{what}: {} sees {now:?}, expected {expected:?}",
            membership.local().name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_through_one_seed_and_drop_a_dead_member() {
    let key = [5; 32];
    let a = node("a", key, &[]).await;
    let b = node("b", key, &[a.local().gossip]).await;
    let c = node("c", key, &[a.local().gossip]).await;
    for m in [&a, &b, &c] {
        wait_for("join", Duration::from_secs(10), m, &["a", "b", "c"]).await;
    }
    let meta = b.members().iter().find(|m| m.name == "c").cloned().unwrap();
    assert_eq!(meta.meta, c.local().meta, "metadata travels with gossip");

    // Shut c down without leaving, as a crash would: the others must notice on their own.
    c.gossip.shutdown().await.unwrap();
    drop(c);
    for m in [&a, &b] {
        wait_for("death", Duration::from_secs(10), m, &["a", "b"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_member_is_dropped_at_once() {
    let key = [6; 32];
    let a = node("a", key, &[]).await;
    let b = node("b", key, &[a.local().gossip]).await;
    wait_for("join", Duration::from_secs(10), &a, &["a", "b"]).await;

    b.leave(Duration::from_secs(2)).await;
    wait_for("leave", Duration::from_secs(3), &a, &["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_key_cannot_join() {
    let a = node("a", [1; 32], &[]).await;
    let intruder = node("intruder", [2; 32], &[a.local().gossip]).await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(names(&a.members()), ["a"]);
    assert_eq!(names(&intruder.members()), ["intruder"]);
}
