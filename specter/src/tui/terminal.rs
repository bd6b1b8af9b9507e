//! Taking over the terminal and, whatever happens, giving it back.
//!
//! The dashboard runs in raw mode on the alternate screen. [`TerminalGuard`] restores both when
//! it is dropped (normal exit or an error), and a panic hook restores them before the panic
//! message is printed, so a crash leaves a usable shell with a readable message instead of a
//! screen that echoes nothing.

use std::{
    io::{self, BufWriter, Stdout},
    sync::{
        Once,
        atomic::{AtomicBool, Ordering},
    },
};

use crossterm::{
    cursor, execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};
use ratatui::{
    Terminal,
    backend::{Backend, CrosstermBackend},
};

/// True while the dashboard owns the terminal; the panic hook restores only then.
static ACTIVE: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

/// The terminal in raw mode on the alternate screen, restored on drop.
pub struct TerminalGuard {
    pub terminal: Terminal<CrosstermBackend<BufWriter<Stdout>>>,
}

impl TerminalGuard {
    pub fn enter() -> io::Result<Self> {
        install_panic_hook();

        terminal::enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on a failure must still restore what was already changed.
        let entered = execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)
            // Buffered, so a frame reaches the terminal in a few writes rather than one per
            // cell run; ratatui flushes after every frame.
            .and_then(|()| Terminal::new(CrosstermBackend::new(BufWriter::new(io::stdout()))));
        match entered {
            Ok(terminal) => Ok(Self { terminal }),
            Err(error) => {
                restore();
                Err(error)
            }
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // Whatever the last frame left buffered goes out before the screen is switched back,
        // not after, onto the user's shell.
        let _ = Backend::flush(self.terminal.backend_mut());
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
