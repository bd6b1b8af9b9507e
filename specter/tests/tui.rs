//! `specter tui` end to end: the real binary in a real terminal (tmux), on the admin API of a
//! real `specter proxy` in front of the two test servers.
//!
//! The test reads the screen as a user would (`tmux capture-pane`), types keys with
//! `tmux send-keys`, and after `q` checks from the shell that the terminal is back in its
//! normal (canonical, echoing) mode. Each tmux server runs on its own socket and is killed when
//! the test ends, pass or fail.

#[path = "support/harness.rs"]
mod harness;
#[path = "support/tmux.rs"]
mod tmux;

use std::{
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

use harness::{ProxyConfig, SPECTER, Specter, TestServer, client, closed_addr, counter};
use tmux::{Tmux, card_value, has_ended};

/// How long the dashboard may take to leave once its terminal is gone: a few passes of its
/// loop, with room for two shared cores.
const LEAVE_DEADLINE: Duration = Duration::from_secs(5);

/// The dashboard under a shell that reports, once it exits, its exit code and the terminal's
/// mode flags, then stays open so the test can read them.
fn tui_command(api: &str) -> String {
    format!(
        "'{SPECTER}' tui --api {api}; echo TUI-EXITED-$?; \
         stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo; \
         sleep 60"
    )
}

/// The shell's report after the dashboard exited: its exit code and the terminal mode flags.
fn assert_exited_cleanly(tmux: &Tmux) {
    let screen = tmux.wait_for("the dashboard to exit", |s| {
        s.contains("TUI-EXITED-") && s.lines().any(|l| l.trim().ends_with("echo"))
    });
    assert!(screen.contains("TUI-EXITED-0"), "exit code 0:\n{screen}");
    let flags: Vec<&str> = screen.lines().map(str::trim).collect();
    assert!(
        flags.contains(&"icanon") && flags.contains(&"echo"),
        "the terminal is back in canonical mode with echo:\n{screen}"
    );
    assert!(
        !flags.contains(&"-icanon") && !flags.contains(&"-echo"),
        "the terminal was left in raw mode:\n{screen}"
    );
}

#[test]
fn dashboard_shows_live_figures_and_drills_down_into_a_divergence() {
    let dir = TempDir::new().expect("create a test directory");
    let live = TestServer::live(dir.path());
    let shadow = TestServer::shadow(dir.path());
    let specter = Specter::start(dir.path(), ProxyConfig::new(live.url(), shadow.url()));

    // 10 mirrored: 5 divergent (3 profiles, 2 orders), 5 identical.
    let http = client();
    for path in ["/profile", "/users/7", "/orders/1", "/users/8", "/profile"]
        .iter()
        .chain(&[
            "/users/9",
            "/orders/1",
            "/users/10",
            "/profile",
            "/users/11",
        ])
    {
        let response = http
            .get(specter.url(path))
            .send()
            .expect("request through the proxy");
        assert_eq!(response.status(), 200, "GET {path}");
    }
    specter.wait_for_stats("10 mirrored, 5 diverged", |stats| {
        counter(stats, "mirrored") == 10 && counter(stats, "diverged") == 5
    });
    specter.wait_for_divergences("", 5);

    let tmux = Tmux::start(120, 40, &tui_command(&format!("http://{}", specter.api)));

    // Each wait names everything the screen must show: a frame can be caught half drawn, so a
    // check made after a wait on one part alone could read the rest from the previous frame.
    let dashboard = |s: &str| {
        card_value(s, "Mirrored").as_deref() == Some("10")
            && card_value(s, "Diverged").as_deref() == Some("5")
            && card_value(s, "Capture loss").as_deref() == Some("n/a in proxy mode")
            && s.contains("GET /orders/{id}")
            && s.contains("GET /profile")
            && s.contains("q quit")
    };
    let screen = tmux.wait_for(
        "the dashboard: 10 mirrored, 5 diverged, both routes",
        dashboard,
    );
    assert!(!screen.contains("unreachable"), "{screen}");

    // A smaller terminal: the dashboard redraws to fit 80x24, key help included.
    tmux.resize(80, 24);
    let screen = tmux.wait_for("the dashboard redrawn at 80x24", |s| {
        s.lines().count() <= 24 && dashboard(s)
    });
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    tmux.resize(120, 40);
    tmux.wait_for("the dashboard at 120x40 again", |s| {
        s.lines().any(|l| l.chars().count() > 80) && dashboard(s)
    });

    // Filter to the orders route, move to the divergences and open the newest one.
    tmux.keys(&["/"]);
    tmux.wait_for("the filter prompt", |s| s.contains("route filter:"));
    tmux.type_text("orders");
    tmux.keys(&["Enter"]);
    tmux.wait_for("the filter applied", |s| {
        s.contains("filter: orders") && !s.contains("route filter:") && !s.contains("GET /profile")
    });
    tmux.keys(&["Tab", "Enter"]);
    let total_row = |s: &str| {
        s.lines()
            .find(|l| l.contains("/total"))
            .is_some_and(|l| l.contains("19.0") && l.contains("19.5"))
    };
    tmux.wait_for(
        "the drill-down on an order: request, route, statuses, /total with both values",
        |s| {
            s.contains("Differences (")
                && s.contains("GET /orders/1")
                && s.contains("route  GET /orders/{id}")
                && s.contains("live 200 · shadow 200")
                && total_row(s)
        },
    );

    // The raw bodies on request, then back to the dashboard.
    tmux.keys(&["r"]);
    tmux.wait_for("the raw bodies", |s| {
        s.contains("Raw responses") && s.contains("\"currency\": \"EUR\"")
    });
    tmux.keys(&["Escape"]);
    tmux.wait_for("the dashboard again", |s| s.contains("Recent divergences"));

    tmux.keys(&["q"]);
    assert_exited_cleanly(&tmux);
}

#[test]
fn unreachable_api_shows_a_banner_and_quits_cleanly() {
    let api = closed_addr();
    let tmux = Tmux::start(80, 24, &tui_command(&format!("http://{api}")));
    tmux.wait_for("the unreachable banner above the key help", |s| {
        s.contains("API unreachable") && s.contains("q quit")
    });

    // It keeps retrying: the failure count goes up.
    tmux.wait_for("a second failed attempt", |s| s.contains("(2 failed)"));

    tmux.keys(&["q"]);
    assert_exited_cleanly(&tmux);
}

#[test]
fn sigterm_leaves_like_q_and_restores_the_terminal() {
    let api = closed_addr();
    let tmux = Tmux::start(80, 24, &tui_command(&format!("http://{api}")));
    tmux.wait_for("the dashboard", |s| s.contains("API unreachable"));

    let pid = tmux.dashboard_pid();
    // SAFETY: kill(2) on a pid read from the pane's own process tree a moment ago; the shell
    // waits for it, so it cannot have been reaped and reused yet.
    let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(
        sent,
        0,
        "SIGTERM to the dashboard: {}",
        std::io::Error::last_os_error()
    );
    assert_exited_cleanly(&tmux);
}

#[test]
fn dashboard_leaves_when_its_terminal_goes_away() {
    let dir = TempDir::new().expect("create a test directory");
    let pid_file = dir.path().join("tui.pid");
    let api = closed_addr();
    // The shell records its pid and becomes the dashboard, so the pid is the dashboard's.
    let tmux = Tmux::start(
        80,
        24,
        &format!(
            "echo $$ > '{}'; exec '{SPECTER}' tui --api http://{api}",
            pid_file.display()
        ),
    );
    tmux.wait_for("the dashboard", |s| s.contains("API unreachable"));
    let pid: libc::pid_t = std::fs::read_to_string(&pid_file)
        .expect("read the dashboard's pid file")
        .trim()
        .parse()
        .expect("the pid file holds a pid");
    let dashboard = KillOnDrop(pid);

    // Closing the window takes the terminal away: reads give end-of-file, writes fail.
    tmux.kill_session();
    let killed = Instant::now();
    while !has_ended(dashboard.0) {
        assert!(
            killed.elapsed() < LEAVE_DEADLINE,
            "the dashboard (pid {pid}) still runs {LEAVE_DEADLINE:?} after its terminal went away"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Ends a process the test started if it is still there when the test ends, pass or fail, so
/// a dashboard that failed to leave does not keep spinning after the test.
struct KillOnDrop(libc::pid_t);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !has_ended(self.0) {
            // SAFETY: kill(2) on the pid the dashboard's shell wrote a moment ago, checked to
            // be still running just before.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}
