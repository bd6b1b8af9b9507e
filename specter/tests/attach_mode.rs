//! `specter attach` on the real kernel: a client host and a server host in network namespaces,
//! joined by a veth pair, with Specter's TC programs on the server's side. Needs root.

#[path = "support/attach.rs"]
mod attach;
#[path = "support/harness.rs"]
mod harness;
#[path = "support/netns.rs"]
mod netns;

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use attach::{AttachStack, LIVE_PORT, read_jsonl, stat};
use serde_json::Value;

/// The value of header `name` in a `[[name, value], ...]` list.
fn header<'a>(headers: &'a Value, name: &str) -> Option<&'a str> {
    headers.as_array()?.iter().find_map(|pair| {
        let pair = pair.as_array()?;
        pair[0]
            .as_str()?
            .eq_ignore_ascii_case(name)
            .then(|| pair[1].as_str())
            .flatten()
    })
}

/// Rebuilt exchanges from the exchange log, by the client's `X-Request-Seq`.
fn rebuilt_by_seq(stack: &AttachStack) -> HashMap<u64, Value> {
    let mut by_seq = HashMap::new();
    for line in stack.exchanges() {
        if let Some(seq) = header(&line["request_headers"], "x-request-seq") {
            let seq: u64 = seq.parse().expect("numeric X-Request-Seq");
            assert!(
                by_seq.insert(seq, line).is_none(),
                "exchange {seq} was rebuilt twice"
            );
        }
    }
    by_seq
}

/// Checks a rebuilt exchange against what the client sent and received.
fn assert_rebuilt_exactly(client: &Value, rebuilt: &Value) {
    let seq = &client["seq"];
    for (client_key, rebuilt_key) in [
        ("method", "method"),
        ("target", "target"),
        ("request_body_len", "request_body_len"),
        ("request_body_xxh3", "request_body_xxh3"),
        ("status", "status"),
        ("response_body_len", "response_body_len"),
        ("response_body_xxh3", "response_body_xxh3"),
    ] {
        assert_eq!(
            client[client_key], rebuilt[rebuilt_key],
            "exchange {seq}: {client_key} differs\nclient: {client}\nrebuilt: {rebuilt}"
        );
    }
    for pair in client["request_headers"]
        .as_array()
        .expect("client headers")
    {
        let (name, value) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        assert_eq!(
            header(&rebuilt["request_headers"], name),
            Some(value),
            "exchange {seq}: request header {name} not rebuilt\nrebuilt: {rebuilt}"
        );
    }
}

#[test]
fn every_exchange_is_rebuilt_exactly() {
    let mut stack = AttachStack::new("");
    stack.start_specter(&[]);

    let log = stack.dir.path().join("client.jsonl");
    let target = format!("{}:{LIVE_PORT}", stack.topo.server_v4);
    let summary = stack.traffic(
        &target,
        &[
            "--mix",
            "full",
            "--requests",
            "3000",
            "--connections",
            "56",
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let sent = summary["sent"].as_u64().unwrap();
    assert!(
        summary["pipelined"].as_u64().unwrap() > 0,
        "the mix pipelined nothing: {summary}"
    );
    assert!(
        summary["expect_continue"].as_u64().unwrap() > 0,
        "no 100-continue: {summary}"
    );

    let stats = stack.wait_stats("every exchange to be seen", |s| {
        stat(s, "exchanges.seen") >= sent
    });
    assert_eq!(
        stat(&stats, "exchanges.seen"),
        sent,
        "seen counts every exchange once"
    );
    assert_eq!(stat(&stats, "capture.ring_drops"), 0);
    assert_eq!(stat(&stats, "capture.exchanges_incomplete"), 0);
    assert_eq!(stat(&stats, "exchanges.incomplete"), 0);
    assert_eq!(stat(&stats, "capture.parse_errors"), 0);

    let rebuilt = rebuilt_by_seq(&stack);
    let client = read_jsonl(&log);
    assert_eq!(client.len() as u64, sent);
    for record in &client {
        let seq = record["seq"].as_u64().unwrap();
        let line = rebuilt
            .get(&seq)
            .unwrap_or_else(|| panic!("exchange {seq} was never rebuilt: {record}"));
        assert_eq!(line["quality"], "complete", "exchange {seq}: {line}");
        assert_rebuilt_exactly(record, line);
    }

    let exit = stack.stop_specter();
    assert!(
        exit.success(),
        "specter exited with {exit}:\n{}",
        stack.specter_log()
    );
}

#[test]
fn ipv6_exchanges_are_rebuilt() {
    let mut stack = AttachStack::new("");
    stack.start_specter(&[]);

    let target = format!("[{}]:{LIVE_PORT}", stack.topo.server_v6);
    let summary = stack.traffic(&target, &["--requests", "200", "--connections", "4"]);
    let sent = summary["sent"].as_u64().unwrap();

    let stats = stack.wait_stats("IPv6 exchanges", |s| stat(s, "exchanges.seen") >= sent);
    assert_eq!(stat(&stats, "exchanges.seen"), sent);
    let clients: Vec<String> = stack
        .exchanges()
        .iter()
        .filter_map(|l| l["client"].as_str().map(str::to_owned))
        .collect();
    assert!(
        clients
            .iter()
            .all(|c| c.starts_with(&format!("[{}]", stack.topo.client_v6))),
        "exchanges not from the IPv6 client: {clients:?}"
    );
}

#[test]
fn capture_started_mid_connection_resynchronises() {
    let mut stack = AttachStack::new("");
    let server = format!("{}:{LIVE_PORT}", stack.topo.server_v4);

    // A keep-alive connection that is already open, with traffic on it, before Specter starts.
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let (to_test, from_client) = std::sync::mpsc::channel::<Vec<u16>>();
    let stream_ns = stack.topo.client.name.clone();
    let handle = std::thread::spawn(move || {
        netns::enter_current_thread(&stream_ns);
        let mut stream = TcpStream::connect(&server).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut statuses = Vec::new();
        let mut exchange = |stream: &mut TcpStream, n: usize| {
            let request =
                format!("GET /users/{n} HTTP/1.1\r\nHost: {server}\r\nX-User-ID: mid-{n}\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            statuses.push(read_response_status(stream));
        };
        for n in 0..3 {
            exchange(&mut stream, n);
        }
        from_test.recv().unwrap();
        for n in 3..8 {
            exchange(&mut stream, n);
        }
        to_test.send(statuses).unwrap();
    });

    std::thread::sleep(Duration::from_millis(300));
    stack.start_specter(&[]);
    to_client.send(()).unwrap();
    let statuses = from_client.recv_timeout(Duration::from_secs(30)).unwrap();
    handle.join().unwrap();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    let stats = stack.wait_stats("the later exchanges", |s| stat(s, "exchanges.seen") >= 5);
    assert_eq!(
        stat(&stats, "exchanges.seen"),
        5,
        "only the requests after attaching are seen"
    );
    let targets: Vec<String> = stack
        .exchanges()
        .iter()
        .filter(|l| l["quality"] == "complete")
        .map(|l| l["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        targets,
        ["/users/3", "/users/4", "/users/5", "/users/6", "/users/7"]
    );
}

/// Reads one response with a Content-Length body and returns its status.
fn read_response_status(stream: &mut TcpStream) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let length: usize = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    text[9..12].parse().unwrap()
}

#[test]
fn loss_reordering_and_duplication_never_pair_wrongly() {
    // A small ring makes the kernel side drop records (lost segments as Specter sees them);
    // netem makes the wire lossy, reordered and duplicated.
    let mut stack = AttachStack::new("");
    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(
        &stack.config,
        config.replace("ring_bytes: 67108864", "ring_bytes: 262144"),
    )
    .unwrap();
    make_the_link_lossy(&stack);
    stack.start_specter(&[]);

    let log = stack.dir.path().join("client.jsonl");
    let target = format!("{}:{LIVE_PORT}", stack.topo.server_v4);
    let summary = stack.traffic(
        &target,
        &[
            "--mix",
            "full",
            "--requests",
            "800",
            "--connections",
            "24",
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let sent = summary["sent"].as_u64().unwrap();

    let stats = stack.wait_settled();
    assert!(
        stat(&stats, "exchanges.seen") <= sent,
        "more exchanges than the client made"
    );
    let by_seq = rebuilt_by_seq(&stack);
    let mut complete = 0;
    for record in read_jsonl(&log) {
        let seq = record["seq"].as_u64().unwrap();
        if let Some(line) = by_seq.get(&seq)
            && line["quality"] == "complete"
        {
            assert_rebuilt_exactly(&record, line);
            complete += 1;
        }
    }
    // The link and the ring really did lose, reorder and repeat segments.
    let disorder = stat(&stats, "capture.retransmits") + stat(&stats, "capture.out_of_order");
    assert!(
        disorder > 0,
        "no reordering or duplication reached the capture: {stats:#}"
    );
    assert!(
        stat(&stats, "capture.gaps") > 0,
        "no segment was lost to the capture: {stats:#}"
    );
    eprintln!(
        "lossy run: {} of {sent} rebuilt complete; gaps {}, retransmits {}, out of order {}, \
         ring drops {}, incomplete {}",
        complete,
        stat(&stats, "capture.gaps"),
        stat(&stats, "capture.retransmits"),
        stat(&stats, "capture.out_of_order"),
        stat(&stats, "capture.ring_drops"),
        stat(&stats, "exchanges.incomplete")
    );
    // Whatever was not rebuilt whole is counted, and never replayed.
    let incomplete = stat(&stats, "exchanges.incomplete");
    assert!(complete > 0, "nothing was rebuilt under netem: {stats:#}");
    assert_eq!(
        stat(&stats, "exchanges.mirrored")
            + stat(&stats, "exchanges.skipped_unsafe")
            + incomplete
            + stat(&stats, "exchanges.truncated")
            + stat(&stats, "exchanges.shadow_dropped"),
        stat(&stats, "exchanges.seen"),
        "every seen exchange is mirrored or counted: {stats:#}"
    );
}

/// Loss, reordering and duplication as the capture point sees them. With `tc netem` (when the
/// kernel has it) on the client's veth; otherwise nftables drops 3% of the client's packets in
/// both directions: a segment the client loses on the way out reaches the server later than
/// those sent after it (reordered, with a hole meanwhile), and a server segment the client
/// loses on the way in is sent again (a duplicate at the capture point).
fn make_the_link_lossy(stack: &AttachStack) {
    let netem = stack
        .topo
        .client
        .command("tc")
        .args([
            "qdisc",
            "add",
            "dev",
            &stack.topo.client_if,
            "root",
            "netem",
            "delay",
            "2ms",
        ])
        .args(["loss", "3%", "duplicate", "3%", "reorder", "20%", "50%"])
        .output()
        .expect("run tc");
    if netem.status.success() {
        return;
    }
    eprintln!("tc netem is unavailable on this kernel; using nftables random drops instead");
    let rules = "table inet lossy {\n\
        chain out { type filter hook output priority 0; tcp dport 8080 numgen random mod 100 < 3 drop; }\n\
        chain in { type filter hook input priority 0; tcp sport 8080 numgen random mod 100 < 3 drop; }\n\
        }\n";
    let file = stack.dir.path().join("lossy.nft");
    std::fs::write(&file, rules).unwrap();
    stack
        .topo
        .client
        .exec_ok(&["nft", "-f", file.to_str().unwrap()]);
}

#[test]
fn replays_to_a_shadow_on_the_same_interface_and_port_are_not_captured() {
    // The shadow listens on the live port, on the client host: replays cross the same veth to
    // the same port as real traffic.
    let mut stack = AttachStack::new("");
    let shadow_addr = format!("{}:{LIVE_PORT}", stack.topo.client_v4);
    let shadow = attach::spawn_in(
        &stack.topo.client,
        "shadow-on-live-port",
        &[
            "testserver",
            "--port",
            &LIVE_PORT.to_string(),
            "--mode",
            "shadow",
            "--bind",
            "0.0.0.0",
        ],
        &stack.dir.path().join("shadow2.log"),
    );
    attach::wait_listening(&stack.topo.client, shadow_addr.parse().unwrap());
    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(
        &stack.config,
        config.replace(
            &format!("http://127.0.0.1:{}", attach::SHADOW_PORT),
            &format!("http://{shadow_addr}"),
        ),
    )
    .unwrap();
    stack.start_specter(&[]);

    let target = format!("{}:{LIVE_PORT}", stack.topo.server_v4);
    let summary = stack.traffic(&target, &["--requests", "300", "--connections", "6"]);
    let sent = summary["sent"].as_u64().unwrap();
    let stats = stack.wait_stats("replays to finish", |s| {
        stat(s, "exchanges.seen") >= sent
            && stat(s, "exchanges.mirrored") + stat(s, "exchanges.skipped_unsafe") >= sent
    });
    std::thread::sleep(Duration::from_millis(500));
    let stats_after = stack.api("/api/stats");
    assert_eq!(stat(&stats, "exchanges.seen"), sent);
    assert_eq!(
        stat(&stats_after, "exchanges.seen"),
        sent,
        "replays were captured as traffic"
    );
    assert!(stat(&stats_after, "capture.own_traffic_skipped") > 0);
    assert!(
        stat(&stats_after, "exchanges.diverged") > 0,
        "the shadow was not reached"
    );
    drop(shadow);
}

/// The BPF links and programs a process holds, from its file descriptors' fdinfo.
fn bpf_objects_of(pid: u32) -> (Vec<String>, Vec<String>) {
    let (mut links, mut programs) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in info.lines() {
            if let Some(id) = line.strip_prefix("link_id:") {
                links.push(id.trim().to_owned());
            } else if let Some(id) = line.strip_prefix("prog_id:") {
                programs.push(id.trim().to_owned());
            }
        }
    }
    links.sort();
    links.dedup();
    programs.sort();
    programs.dedup();
    (links, programs)
}

#[test]
fn sigterm_leaves_nothing_attached() {
    let mut stack = AttachStack::new("");
    stack.start_specter(&[]);
    let iface = stack.topo.server_if.clone();

    let pid = stack.specter.as_ref().unwrap().pid();
    let (links, programs) = bpf_objects_of(pid);
    assert_eq!(
        programs.len(),
        2,
        "ingress and egress programs loaded: {programs:?}"
    );
    for id in &programs {
        let shown = netns::run("bpftool", &["prog", "show", "id", id]);
        assert!(
            shown.contains("specter_"),
            "program {id} is not Specter's: {shown}"
        );
    }
    // TCX links (kernel 6.6+) are held as fds; netlink filters show in `tc filter show`.
    let filters = stack
        .topo
        .server
        .exec_ok(&["tc", "filter", "show", "dev", &iface, "ingress"]);
    assert!(
        links.len() == 2 || filters.contains("specter"),
        "not attached: {links:?} {filters}"
    );

    let exit = stack.stop_specter();
    assert!(exit.success(), "exit {exit}:\n{}", stack.specter_log());

    for id in &links {
        let gone = Command::new("bpftool")
            .args(["link", "show", "id", id])
            .output()
            .unwrap();
        assert!(!gone.status.success(), "link {id} is still there");
    }
    for id in &programs {
        let gone = Command::new("bpftool")
            .args(["prog", "show", "id", id])
            .output()
            .unwrap();
        assert!(!gone.status.success(), "program {id} is still loaded");
    }
    for direction in ["ingress", "egress"] {
        let filters = stack
            .topo
            .server
            .exec_ok(&["tc", "filter", "show", "dev", &iface, direction]);
        assert!(
            !filters.contains("specter"),
            "tc filters left on {direction}: {filters}"
        );
    }
    let qdiscs = stack
        .topo
        .server
        .exec_ok(&["tc", "qdisc", "show", "dev", &iface]);
    assert!(
        !qdiscs.contains("clsact"),
        "clsact qdisc left behind: {qdiscs}"
    );
    let log = stack.specter_log();
    assert!(
        log.contains("Detached capture programs"),
        "no detach logged:\n{log}"
    );
}

#[test]
fn without_bpf_permission_attach_falls_back_to_proxy_mode() {
    let stack = AttachStack::new("");
    let drop_caps = "cap_bpf,cap_sys_admin,cap_net_admin,cap_perfmon";
    let specter_cmd = format!(
        "{} attach --iface {} --config {}",
        harness::SPECTER,
        stack.topo.server_if,
        stack.config.display()
    );

    // --no-fallback: exits non-zero and says why.
    let output = stack
        .topo
        .server
        .command("capsh")
        .args([
            &format!("--drop={drop_caps}"),
            "--",
            "-c",
            &format!("{specter_cmd} --no-fallback"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "attach without CAP_BPF succeeded:\n{stderr}"
    );
    assert!(stderr.contains("cannot capture on"), "{stderr}");

    // Without it: one WARN line naming the cause, then proxy mode serves the live service.
    let log = stack.dir.path().join("fallback.log");
    let mut command = stack.topo.server.command("capsh");
    command.args([&format!("--drop={drop_caps}"), "--", "-c", &specter_cmd]);
    let mut fallback = harness::ChildGuard::spawn("fallback", command, &log);
    attach::wait_listening(&stack.topo.server, "127.0.0.1:18080".parse().unwrap());
    let body = stack.topo.server.enter(|| {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get("http://127.0.0.1:18080/users/5")
            .send()
            .unwrap()
            .text()
            .unwrap()
    });
    assert!(
        body.contains("user-5"),
        "proxy fallback did not serve the live service: {body}"
    );
    let text = fallback.log_text();
    let warns: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warns.len(), 1, "expected one WARN line:\n{text}");
    assert!(
        warns[0].contains("falling back to proxy mode") && warns[0].contains("cause"),
        "{text}"
    );
    fallback.terminate();
    assert!(fallback.wait_exit(Duration::from_secs(20)).success());
}

#[test]
fn a_missing_interface_is_named_in_the_error() {
    let stack = AttachStack::new("");
    let output = stack
        .topo
        .server
        .command(harness::SPECTER)
        .args([
            "attach",
            "--iface",
            "nosuch0",
            "--config",
            stack.config.to_str().unwrap(),
            "--no-fallback",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nosuch0") && stderr.contains("does not exist"),
        "{stderr}"
    );
}

#[test]
fn reattaches_cleanly_after_a_crash() {
    let mut stack = AttachStack::new("");
    stack.start_specter(&[]);
    let pid = stack.specter.as_ref().unwrap().pid();
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let killed = stack
        .specter
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(10));
    assert!(!killed.success());
    stack.specter = None;

    // The store was left open by a killed process; the new one must still start, attach once,
    // and capture.
    stack.start_specter(&[]);
    let pid = stack.specter.as_ref().unwrap().pid();
    let (_, programs) = bpf_objects_of(pid);
    assert_eq!(programs.len(), 2, "{programs:?}");
    let target = format!("{}:{LIVE_PORT}", stack.topo.server_v4);
    let summary = stack.traffic(&target, &["--requests", "50", "--connections", "2"]);
    let sent = summary["sent"].as_u64().unwrap();
    let stats = stack.wait_stats("capture after re-attaching", |s| {
        stat(s, "exchanges.seen") >= sent
    });
    assert_eq!(
        stat(&stats, "exchanges.seen"),
        sent,
        "each exchange seen once, not twice"
    );
    let exit = stack.stop_specter();
    assert!(exit.success(), "{}", stack.specter_log());
}
