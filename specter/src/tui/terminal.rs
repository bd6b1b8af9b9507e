//! Taking over the terminal and, whatever happens, giving it back.
//!
//! The dashboard runs in raw mode on the alternate screen. [`TerminalGuard`] restores both when
//! it is dropped (normal exit or an error), and a panic hook restores them before the panic
//! message is printed, so a crash leaves a usable shell with a readable message instead of a
//! screen that echoes nothing.
//!
//! It also watches for the terminal going away (its window closed, its tmux session killed,
//! its SSH connection dropped): a terminal that hung up reads as end-of-file at once and for
//! ever, which crossterm's reader retries in a loop without returning, so the dashboard waits
//! for keys here and hands the terminal to crossterm only while it is still there. A hang-up in
//! the instant between that wait and crossterm's read still ends the process: it comes with a
//! SIGHUP, and the poller's signal watcher leaves without the drawing loop if need be.

use std::{
    fs::File,
    io::{self, BufWriter, IsTerminal as _, Stdout},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crossterm::{
    cursor, execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{
    Frame, Terminal,
    backend::{Backend, CrosstermBackend},
};

/// True while the dashboard owns the terminal; the panic hook restores only then.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

/// The terminal in raw mode on the alternate screen, restored on drop.
pub struct TerminalGuard {
    /// Taken only on drop.
    terminal: Option<Terminal<CrosstermBackend<BufWriter<Stdout>>>>,
    keys: KeySource,
}

/// What a wait for keys found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// Keys are waiting to be read.
    Ready,
    /// None came in time.
    Idle,
    /// The terminal hung up: no key will ever come, and nothing drawn will be seen.
    HungUp,
}

/// Where crossterm reads keys from: standard input when it is a terminal, else the process's
/// controlling terminal.
enum KeySource {
    Stdin,
    Tty(File),
}

impl KeySource {
    fn open() -> io::Result<Self> {
        if io::stdin().is_terminal() {
            Ok(Self::Stdin)
        } else {
            File::open("/dev/tty").map(Self::Tty)
        }
    }
}

impl TerminalGuard {
    pub fn enter() -> io::Result<Self> {
        install_panic_hook();
        let keys = KeySource::open()?;

        terminal::enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on a failure must still restore what was already changed.
        let entered = execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)
            // Buffered, so a frame reaches the terminal in a few writes rather than one per
            // cell run; ratatui flushes after every frame.
            .and_then(|()| Terminal::new(CrosstermBackend::new(BufWriter::new(io::stdout()))));
        match entered {
            Ok(terminal) => Ok(Self {
                terminal: Some(terminal),
                keys,
            }),
            Err(error) => {
                restore();
                Err(error)
            }
        }
    }

    /// Draws one frame and sends it to the terminal.
    pub fn draw(&mut self, render: impl FnOnce(&mut Frame<'_>)) -> io::Result<()> {
        if let Some(terminal) = &mut self.terminal {
            terminal.draw(render)?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for keys, and says whether the terminal is still there.
    pub fn wait_for_keys(&self, timeout: Duration) -> io::Result<Keys> {
        match &self.keys {
            KeySource::Stdin => wait_for_keys(io::stdin().as_fd(), timeout),
            KeySource::Tty(tty) => wait_for_keys(tty.as_fd(), timeout),
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(mut terminal) = self.terminal.take() {
            // Whatever the last frame left buffered goes out before the screen is switched
            // back, not after, onto the user's shell.
            let _ = Backend::flush(terminal.backend_mut());
            // Dropped with its cursor hidden, ratatui's terminal shows it, and prints a line
            // on stderr when that fails, as it does once the terminal has gone away. That line
            // would bury the reason the dashboard stopped, so such a terminal is not dropped;
            // its buffers go with the process.
            if terminal.show_cursor().is_err() {
                std::mem::forget(terminal);
            }
        }
        restore();
    }
}

/// Leaves the alternate screen, shows the cursor and turns raw mode off, once.
fn restore() {
    if !ACTIVE.swap(false, Ordering::SeqCst) {
        return;
    }
    // Nothing useful can be done if the terminal is already gone; the process is leaving it.
    let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    let _ = terminal::disable_raw_mode();
}

/// Ends the process at once with `code`, for when the drawing loop is stuck on a terminal that
/// stopped answering. Only raw mode is turned off: writing to the screen could block on the
/// very terminal the loop is stuck on.
pub fn exit_now(code: i32) -> ! {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
    }
    std::process::exit(code)
}

/// Waits up to `timeout` for `fd` to have input. A hang-up is reported as such even with input
/// still queued: whatever is left unread can no longer be answered on screen.
pub fn wait_for_keys(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<Keys> {
    let mut poll_fd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll(2) on one pollfd that lives on this stack frame for the whole call, naming a
    // descriptor that `fd` keeps open for as long.
    let ready = unsafe { libc::poll(&raw mut poll_fd, 1, millis) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        // A signal (SIGWINCH on a resize, say) cut the wait short; the caller comes round again.
        return match error.kind() {
            io::ErrorKind::Interrupted => Ok(Keys::Idle),
            _ => Err(error),
        };
    }

    if poll_fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Ok(Keys::HungUp)
    } else if poll_fd.revents & libc::POLLIN != 0 {
        Ok(Keys::Ready)
    } else {
        Ok(Keys::Idle)
    }
}

/// Chains a hook in front of the existing one that restores the terminal first, so the panic
/// message lands on the normal screen of a terminal in its usual mode.
fn install_panic_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}
