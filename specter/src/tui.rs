//! `specter tui`: a terminal dashboard on a running Specter's admin API.
//!
//! It sits outside the pipeline, as a reader of the serve stage: everything it shows comes from
//! `/api/stats`, `/api/divergences` and `/api/divergences/{id}` (and, on nodes that serve it,
//! `/api/routes/{route}/fields`), so it can watch a node on another host and needs no access to
//! the store. The parts:
//!
//! - [`client`]: the API's JSON and the thread that polls it about once a second;
//! - [`app`]: the state and what each key or answer does to it, free of I/O so tests drive it;
//! - [`ui`]: drawing the state with ratatui, usable at 80x24;
//! - [`terminal`]: raw mode and the alternate screen, restored on exit and on panic, and the
//!   wait for keys that notices when the terminal goes away.
//!
//! The dashboard never writes logs: anything printed to the terminal would tear the screen, so
//! the binary does not set up logging for this subcommand.

mod app;
mod client;
mod terminal;
mod ui;

use std::time::Duration;

use crossterm::event::{self as term_event, Event as TermEvent};
use thiserror::Error;

use crate::verdict::Scope;

use self::{
    app::{App, Input},
    client::{ApiBase, Poller},
    terminal::{Keys, TerminalGuard},
};

/// How often the dashboard refreshes from the API.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// The longest the loop waits for a key before looking for API answers.
const INPUT_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug, Error)]
pub enum TuiError {
    #[error("--api {url:?} is not usable: {reason}")]
    ApiUrl { url: String, reason: String },
    #[error("cannot start the dashboard's API poller: {0}")]
    Poller(#[source] std::io::Error),
    #[error("cannot take over the terminal (is stdout a terminal?): {0}")]
    TerminalSetup(#[source] std::io::Error),
    #[error("terminal input or output failed: {0}")]
    Terminal(#[source] std::io::Error),
    #[error("the terminal went away (its window, session or connection closed)")]
    TerminalGone,
}

/// Runs the dashboard on the admin API at `api` (e.g. `http://127.0.0.1:9090`) until the user
/// quits, showing that node's figures or, with [`Scope::Cluster`], its whole cluster's.
/// Blocks; it starts its own thread and runtime for the HTTP calls, so it may be called from a
/// blocking thread of another runtime (not from inside an async task).
pub fn run(api: String, scope: Scope) -> Result<(), TuiError> {
    let base = ApiBase::parse(&api).map_err(|reason| TuiError::ApiUrl {
        url: api.clone(),
        reason,
    })?;
    let poller = Poller::spawn(base.clone(), scope, REFRESH_INTERVAL).map_err(TuiError::Poller)?;
    let mut guard = TerminalGuard::enter().map_err(TuiError::TerminalSetup)?;
    let mut app = App::new(base.as_str()).in_scope(scope);

    // Every pass draws, waits briefly for keys, then takes whatever the poller has answered
    // (a signal included). A resize needs nothing special: the next pass draws at the new size.
    while !app.should_quit() {
        guard
            .draw(|frame| ui::draw(frame, &app))
            .map_err(TuiError::Terminal)?;

        // crossterm is asked for keys only once they are there, and then for all it has: asked
        // on a terminal that hung up, it would never return.
        match guard
            .wait_for_keys(INPUT_WAIT)
            .map_err(TuiError::Terminal)?
        {
            Keys::HungUp => return Err(TuiError::TerminalGone),
            Keys::Idle => {}
            Keys::Ready => {
                while term_event::poll(Duration::ZERO).map_err(TuiError::Terminal)? {
                    if let TermEvent::Key(key) = term_event::read().map_err(TuiError::Terminal)?
                        && let Some(request) = app.update(Input::Key(key))
                    {
                        poller.send(request);
                    }
                }
            }
        }
        while let Some(reply) = poller.try_recv() {
            if let Some(request) = app.update(Input::Reply(reply)) {
                poller.send(request);
            }
        }
    }

    drop(guard);
    Ok(())
}

#[cfg(test)]
mod tests;
