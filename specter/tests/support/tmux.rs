//! A real terminal for the dashboard's end-to-end tests: a detached tmux session on a private
//! server, read back with `capture-pane` and driven with `send-keys`, killed on drop.

#![allow(
    dead_code,
    reason = "shared by test files that each use a different subset"
)]

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

/// How long the dashboard may take to show what a test waits for. Generous: the tests share
/// two cores with the processes they start.
pub const SCREEN_DEADLINE: Duration = Duration::from_secs(20);
const TMUX: &str = "tmux";

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// A detached tmux session on a private server, killed on drop.
pub struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    /// Runs `shell_command` in a new `width`x`height` session.
    pub fn start(width: u16, height: u16, shell_command: &str) -> Self {
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

    pub fn run(&self, args: &[&str]) -> Output {
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
    pub fn screen(&self) -> String {
        let output = self.run(&["capture-pane", "-p", "-t", &self.session]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Sends tmux key names (`Enter`, `Tab`, `q`).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        let output = self.run(&args);
        assert!(output.status.success(), "tmux send-keys {keys:?} failed");
    }

    /// Types `text` literally.
    pub fn type_text(&self, text: &str) {
        let output = self.run(&["send-keys", "-t", &self.session, "-l", text]);
        assert!(output.status.success(), "tmux send-keys -l {text:?} failed");
    }

    pub fn resize(&self, width: u16, height: u16) {
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
    pub fn dashboard_pid(&self) -> libc::pid_t {
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

    /// Ends the session as closing its window would: tmux closes the pane's terminal, so the
    /// programs in it find it hung up.
    pub fn kill_session(&self) {
        let output = self.run(&["kill-session", "-t", &self.session]);
        assert!(
            output.status.success(),
            "tmux kill-session failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Polls the screen until `done` holds; panics with the last screen after the deadline.
    pub fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
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
pub fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` has ended: no such process, or one that has exited and only waits to be
/// reaped (which a container's first process may never do).
pub fn has_ended(pid: libc::pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    matches!(state, Some("Z" | "X") | None)
}

/// The value line of the dashboard card titled `title`.
pub fn card_value(screen: &str, title: &str) -> Option<String> {
    let lines: Vec<&str> = screen.lines().collect();
    lines.iter().enumerate().find_map(|(row, line)| {
        let byte = line.find(title)?;
        let column = line[..byte].chars().count();
        let below: String = lines.get(row + 1)?.chars().skip(column).collect();
        Some(below.split('│').next().unwrap_or("").trim().to_owned())
    })
}
