//! `specter tui` end to end: the real binary in a real terminal (tmux), on the admin API of a
//! real `specter proxy` in front of the two test servers.
//!
//! The test reads the screen as a user would (`tmux capture-pane`), types keys with
//! `tmux send-keys`, and after `q` checks from the shell that the terminal is back in its
//! normal (canonical, echoing) mode. Each tmux server runs on its own socket and is killed when
//! the test ends, pass or fail.

#[path = "support/harness.rs"]
mod harness;

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use tempfile::TempDir;

use harness::{ProxyConfig, SPECTER, Specter, TestServer, client, closed_addr, counter};

/// How long the dashboard may take to show what the test waits for. Generous: the tests share
/// two cores with the processes they start.
const SCREEN_DEADLINE: Duration = Duration::from_secs(20);
const TMUX: &str = "tmux";

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// A detached tmux session on a private server, killed on drop.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    /// Runs `shell_command` in a new `width`x`height` session.
    fn start(width: u16, height: u16, shell_command: &str) -> Self {
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let tmux = Tmux {
            socket: format!("specter-tui-test-{}-{n}", std::process::id()),
            session: format!("tui{n}"),
        };
        let output = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            &tmux.session,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
            shell_command,
        ]);
        assert!(
            output.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(TMUX)
            // -u: the pane is UTF-8 whatever the test's locale, so box drawing reads back.
            .args(["-u", "-L", &self.socket])
            .args(args)
            .env_remove("TMUX")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap_or_else(|e| panic!("cannot run tmux: {e}"))
    }

    /// The visible screen, one string per row.
    fn screen(&self) -> String {
        let output = self.run(&["capture-pane", "-p", "-t", &self.session]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Sends tmux key names (`Enter`, `Tab`, `q`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        let output = self.run(&args);
        assert!(output.status.success(), "tmux send-keys {keys:?} failed");
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        let output = self.run(&["send-keys", "-t", &self.session, "-l", text]);
        assert!(output.status.success(), "tmux send-keys -l {text:?} failed");
    }

    fn resize(&self, width: u16, height: u16) {
        let output = self.run(&[
            "resize-window",
            "-t",
            &self.session,
            "-x",
            &width.to_string(),
            "-y",
            &height.to_string(),
        ]);
        assert!(
            output.status.success(),
            "tmux resize-window failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The process the pane's shell started: the dashboard, while it runs.
    fn dashboard_pid(&self) -> libc::pid_t {
        let output = self.run(&["display-message", "-p", "-t", &self.session, "#{pane_pid}"]);
        let shell: libc::pid_t = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("tmux gave no pane pid: {e}"));
        let children: Vec<libc::pid_t> = std::fs::read_dir("/proc")
            .expect("read /proc")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid| parent_of(*pid) == Some(shell))
            .collect();
        assert_eq!(
            children.len(),
            1,
            "the pane's shell runs exactly the dashboard"
        );
        children[0]
    }

    /// Polls the screen until `done` holds; panics with the last screen after the deadline.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                started.elapsed() < SCREEN_DEADLINE,
                "timed out after {SCREEN_DEADLINE:?} waiting for {what}; the screen:\n{screen}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The parent of `pid`, from `/proc/<pid>/stat` (the field after the parenthesised name).
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// The dashboard under a shell that reports, once it exits, its exit code and the terminal's
/// mode flags, then stays open so the test can read them.
fn tui_command(api: &str) -> String {
    format!(
        "'{SPECTER}' tui --api {api}; echo TUI-EXITED-$?; \
         stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon -e echo -e -echo; \
         sleep 60"
    )
}

/// The value line of the dashboard card titled `title`.
fn card_value(screen: &str, title: &str) -> Option<String> {
    let lines: Vec<&str> = screen.lines().collect();
    lines.iter().enumerate().find_map(|(row, line)| {
        let byte = line.find(title)?;
        let column = line[..byte].chars().count();
        let below: String = lines.get(row + 1)?.chars().skip(column).collect();
        Some(below.split('│').next().unwrap_or("").trim().to_owned())
    })
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
