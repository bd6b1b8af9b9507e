//! The dashboard's state and what each key and each API answer does to it.
//!
//! Nothing here touches the terminal or the network: [`App::update`] takes an [`Input`] (a key
//! or a [`Reply`] from the poller) and may hand back a [`Request`] for the poller, and
//! `ui::draw` paints whatever state results. That split is what lets the tests drive the whole
//! dashboard with made-up keys and JSON.
//!
//! The screens form a stack above the dashboard: Enter on a divergence pushes its drill-down,
//! `n` pushes the noise view of a route, Esc or `b` pops. A later view is one more [`Screen`]
//! variant, its keys in [`App::on_screen_key`] and its drawing in `ui`.

use std::cell::Cell;

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::client::{DivergenceRef, FieldsReport, Reply, Request, RouteStats, Stats};
use crate::{
    event::{Event, EventSummary},
    verdict::Scope,
};

/// Rows a page key moves.
const PAGE: isize = 10;

/// What the dashboard reacts to.
#[derive(Debug)]
pub enum Input {
    Key(KeyEvent),
    Reply(Reply),
}

/// The two lists of the dashboard; Tab moves between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    Routes,
    Divergences,
}

/// How the routes table is ordered, highest first; `s` steps through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteSort {
    /// diverged / compared.
    DivergenceRate,
    /// Mirrored exchanges.
    Volume,
    /// Shadow over live latency (p90). A node too old to report it per route gets volume
    /// order instead, and the table's title says so.
    LatencyRatio,
}

impl RouteSort {
    fn next(self) -> Self {
        match self {
            Self::DivergenceRate => Self::Volume,
            Self::Volume => Self::LatencyRatio,
            Self::LatencyRatio => Self::DivergenceRate,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::DivergenceRate => "divergence rate",
            Self::Volume => "volume",
            Self::LatencyRatio => "latency ratio",
        }
    }
}

/// How the last calls to the API went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// No answer yet.
    Connecting,
    Connected,
    /// The last stats call failed; the poller keeps trying.
    Unreachable {
        error: String,
        failures: u32,
    },
}

/// Something fetched on demand.
#[derive(Debug)]
pub enum Load<T> {
    Loading,
    Loaded(T),
    Failed(String),
}

/// The drill-down on one divergence.
#[derive(Debug)]
pub struct DivergenceScreen {
    pub divergence: DivergenceRef,
    /// Known from the list before the event arrives, so `n` works while loading.
    pub route: String,
    pub event: Load<Box<Event>>,
    /// Raw bodies (and headers) instead of the differing fields.
    pub raw: bool,
    pub scroll: Scroll,
}

/// The fields of one route as the node classifies them (noise or signal).
#[derive(Debug)]
pub struct NoiseScreen {
    pub route: String,
    pub report: NoiseState,
    pub scroll: Scroll,
}

#[derive(Debug)]
pub enum NoiseState {
    Loading,
    /// The node has no such endpoint (404): it predates field classification.
    NotAvailable(String),
    Failed(String),
    Loaded(FieldsReport),
}

/// A screen above the dashboard.
#[derive(Debug)]
pub enum Screen {
    Divergence(DivergenceScreen),
    Noise(NoiseScreen),
}

/// A line offset into a scrollable view. Drawing records the largest useful offset of the last
/// frame, so scrolling stops at the end instead of running into blank space.
#[derive(Debug, Default)]
pub struct Scroll {
    offset: u16,
    limit: Cell<Option<u16>>,
}

impl Scroll {
    pub fn offset(&self) -> u16 {
        match self.limit.get() {
            Some(limit) => self.offset.min(limit),
            None => self.offset,
        }
    }

    /// Called by drawing with the lines that exist and the lines that fit.
    pub fn set_bounds(&self, total: usize, visible: usize) {
        let limit = total.saturating_sub(visible);
        self.limit
            .set(Some(u16::try_from(limit).unwrap_or(u16::MAX)));
    }

    fn by(&mut self, delta: isize) {
        let current = usize::from(self.offset());
        let target = if delta < 0 {
            current.saturating_sub(delta.unsigned_abs())
        } else {
            current.saturating_add(delta.unsigned_abs())
        };
        let mut offset = u16::try_from(target).unwrap_or(u16::MAX);
        if let Some(limit) = self.limit.get() {
            offset = offset.min(limit);
        }
        self.offset = offset;
    }

    fn top(&mut self) {
        self.offset = 0;
    }

    fn bottom(&mut self) {
        self.offset = self.limit.get().unwrap_or(u16::MAX);
    }
}

/// The whole dashboard state.
#[derive(Debug)]
pub struct App {
    /// The API's base URL, for the header and the banner.
    pub api: String,
    pub connection: Connection,
    pub stats: Option<Stats>,
    /// Newest first, as the API lists them.
    pub divergences: Vec<EventSummary>,
    /// Why the last divergence list call failed, when stats still answered.
    pub list_error: Option<String>,
    pub focus: Pane,
    pub sort: RouteSort,
    /// The applied route filter (case-insensitive substring); empty for none.
    pub filter: String,
    /// The filter being typed after `/`, not applied until Enter.
    pub filter_input: Option<String>,
    /// Selections are kept by identity, so new divergences arriving at the top of the list do
    /// not move the highlight off the one the user is looking at.
    selected_route: Option<String>,
    selected_divergence: Option<DivergenceRef>,
    pub screens: Vec<Screen>,
    /// Whose figures the dashboard shows: the node's, or its whole cluster's.
    pub scope: Scope,
    quit: bool,
}

impl App {
    pub fn new(api: impl Into<String>) -> Self {
        Self {
            api: api.into(),
            connection: Connection::Connecting,
            stats: None,
            divergences: Vec::new(),
            list_error: None,
            focus: Pane::Routes,
            sort: RouteSort::DivergenceRate,
            filter: String::new(),
            filter_input: None,
            selected_route: None,
            selected_divergence: None,
            screens: Vec::new(),
            scope: Scope::Local,
            quit: false,
        }
    }

    /// The dashboard of a whole cluster (or of the node alone).
    #[must_use]
    pub fn in_scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    pub fn should_quit(&self) -> bool {
        self.quit
    }

    /// Applies one input; returns what to ask the API for, if anything.
    pub fn update(&mut self, input: Input) -> Option<Request> {
        match input {
            Input::Key(key) => self.on_key(key),
            Input::Reply(reply) => {
                self.apply_reply(reply);
                None
            }
        }
    }

    pub fn apply_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Signal => self.quit = true,
            Reply::Stats(Ok(stats)) => self.apply_stats(*stats),
            Reply::Stats(Err(error)) => self.api_failed(error.to_string()),
            Reply::Divergences(Ok(list)) => self.apply_divergences(list),
            Reply::Divergences(Err(error)) => self.list_error = Some(error.to_string()),
            Reply::Divergence(divergence, result) => {
                for screen in &mut self.screens {
                    if let Screen::Divergence(screen) = screen
                        && screen.divergence == divergence
                    {
                        screen.event = match &result {
                            Ok(event) => Load::Loaded(event.clone()),
                            Err(error) => Load::Failed(error.to_string()),
                        };
                    }
                }
            }
            Reply::Fields(route, result) => {
                for screen in &mut self.screens {
                    if let Screen::Noise(screen) = screen
                        && screen.route == route
                    {
                        screen.report = match &result {
                            Ok(report) => NoiseState::Loaded(report.clone()),
                            Err(error) if error.is_missing_endpoint() => {
                                NoiseState::NotAvailable(error.to_string())
                            }
                            Err(error) => NoiseState::Failed(error.to_string()),
                        };
                    }
                }
            }
        }
    }

    /// A fresh `/api/stats` answer.
    pub fn apply_stats(&mut self, stats: Stats) {
        self.connection = Connection::Connected;
        self.stats = Some(stats);
    }

    /// A fresh `/api/divergences` answer.
    pub fn apply_divergences(&mut self, list: Vec<EventSummary>) {
        self.list_error = None;
        self.divergences = list;
    }

    /// A failed stats call: the banner shows it; the last figures stay on screen.
    pub fn api_failed(&mut self, error: String) {
        let failures = match &self.connection {
            Connection::Unreachable { failures, .. } => failures + 1,
            _ => 1,
        };
        self.connection = Connection::Unreachable { error, failures };
    }

    /// The routes the filter lets through, in the current sort order.
    pub fn visible_routes(&self) -> Vec<&RouteStats> {
        let Some(stats) = &self.stats else {
            return Vec::new();
        };
        let mut routes: Vec<&RouteStats> = stats
            .routes
            .iter()
            .filter(|r| self.passes_filter(&r.route))
            .collect();

        // Highest first; a route without a figure sorts after every route with one; equal
        // figures keep a stable order by name so rows do not jump between refreshes.
        let by_figure = |figure: fn(&RouteStats) -> Option<f64>| {
            move |a: &&RouteStats, b: &&RouteStats| {
                let (fa, fb) = (figure(a), figure(b));
                fb.partial_cmp(&fa)
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then_with(|| b.mirrored.cmp(&a.mirrored))
                    .then_with(|| a.route.cmp(&b.route))
            }
        };
        match self.effective_sort() {
            RouteSort::DivergenceRate => routes.sort_by(by_figure(RouteStats::divergence_rate)),
            RouteSort::Volume => routes.sort_by(|a, b| {
                b.mirrored
                    .cmp(&a.mirrored)
                    .then_with(|| a.route.cmp(&b.route))
            }),
            RouteSort::LatencyRatio => routes.sort_by(by_figure(|r| r.latency_ratio)),
        }
        routes
    }

    /// The order actually applied: latency ratio falls back to volume while no route has one.
    pub fn effective_sort(&self) -> RouteSort {
        let has_ratio = self
            .stats
            .as_ref()
            .is_some_and(|s| s.routes.iter().any(|r| r.latency_ratio.is_some()));
        match self.sort {
            RouteSort::LatencyRatio if !has_ratio => RouteSort::Volume,
            sort => sort,
        }
    }

    /// The divergences of the routes the filter lets through, newest first.
    pub fn visible_divergences(&self) -> Vec<&EventSummary> {
        self.divergences
            .iter()
            .filter(|d| self.passes_filter(&d.route))
            .collect()
    }

    fn passes_filter(&self, route: &str) -> bool {
        self.filter.is_empty() || route.to_lowercase().contains(&self.filter.to_lowercase())
    }

    pub fn selected_route_index(&self) -> Option<usize> {
        let routes = self.visible_routes();
        if routes.is_empty() {
            return None;
        }
        let found = self
            .selected_route
            .as_ref()
            .and_then(|name| routes.iter().position(|r| &r.route == name));
        Some(found.unwrap_or(0))
    }

    pub fn selected_divergence_index(&self) -> Option<usize> {
        let list = self.visible_divergences();
        if list.is_empty() {
            return None;
        }
        let found = self
            .selected_divergence
            .as_ref()
            .and_then(|selected| list.iter().position(|d| selected.names(d)));
        Some(found.unwrap_or(0))
    }

    pub fn selected_route(&self) -> Option<&RouteStats> {
        let index = self.selected_route_index()?;
        self.visible_routes().get(index).copied()
    }

    pub fn selected_divergence(&self) -> Option<&EventSummary> {
        let index = self.selected_divergence_index()?;
        self.visible_divergences().get(index).copied()
    }

    fn on_key(&mut self, key: KeyEvent) -> Option<Request> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return None;
        }
        if self.filter_input.is_some() {
            self.on_filter_key(key);
            return None;
        }

        match key.code {
            KeyCode::Char('q') => {
                self.quit = true;
                None
            }
            KeyCode::Char('n') => self.open_noise(),
            _ if self.screens.is_empty() => self.on_dashboard_key(key),
            _ => {
                self.on_screen_key(key);
                None
            }
        }
    }

    /// Typing a route filter: Enter applies it, Esc leaves the old one in place.
    fn on_filter_key(&mut self, key: KeyEvent) {
        let Some(input) = &mut self.filter_input else {
            return;
        };
        match key.code {
            KeyCode::Esc => self.filter_input = None,
            KeyCode::Enter => {
                self.filter = input.trim().to_owned();
                self.filter_input = None;
            }
            KeyCode::Backspace => {
                input.pop();
            }
            KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => input.push(c),
            _ => {}
        }
    }

    fn on_dashboard_key(&mut self, key: KeyEvent) -> Option<Request> {
        match key.code {
            KeyCode::Char('j') | KeyCode::Down => self.move_selection(1),
            KeyCode::Char('k') | KeyCode::Up => self.move_selection(-1),
            KeyCode::PageDown => self.move_selection(PAGE),
            KeyCode::PageUp => self.move_selection(-PAGE),
            KeyCode::Char('g') | KeyCode::Home => self.move_selection(isize::MIN / 2),
            KeyCode::Char('G') | KeyCode::End => self.move_selection(isize::MAX / 2),
            KeyCode::Tab | KeyCode::BackTab => {
                self.focus = match self.focus {
                    Pane::Routes => Pane::Divergences,
                    Pane::Divergences => Pane::Routes,
                };
            }
            KeyCode::Char('s') => self.sort = self.sort.next(),
            KeyCode::Char('/') => self.filter_input = Some(self.filter.clone()),
            KeyCode::Esc | KeyCode::Char('b') => self.filter.clear(),
            KeyCode::Enter => return self.open_selected(),
            _ => {}
        }
        None
    }

    fn on_screen_key(&mut self, key: KeyEvent) {
        if matches!(key.code, KeyCode::Esc | KeyCode::Char('b')) {
            self.screens.pop();
            return;
        }
        let scroll = match self.screens.last_mut() {
            Some(Screen::Divergence(screen)) => {
                if key.code == KeyCode::Char('r') {
                    screen.raw = !screen.raw;
                    screen.scroll = Scroll::default();
                    return;
                }
                &mut screen.scroll
            }
            Some(Screen::Noise(screen)) => &mut screen.scroll,
            None => return,
        };
        match key.code {
            KeyCode::Char('j') | KeyCode::Down => scroll.by(1),
            KeyCode::Char('k') | KeyCode::Up => scroll.by(-1),
            KeyCode::PageDown | KeyCode::Char(' ') => scroll.by(PAGE),
            KeyCode::PageUp => scroll.by(-PAGE),
            KeyCode::Char('g') | KeyCode::Home => scroll.top(),
            KeyCode::Char('G') | KeyCode::End => scroll.bottom(),
            _ => {}
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let step = |index: Option<usize>, len: usize| {
            let current = index.unwrap_or(0);
            let target = if delta < 0 {
                current.saturating_sub(delta.unsigned_abs())
            } else {
                current.saturating_add(delta.unsigned_abs())
            };
            target.min(len - 1)
        };
        match self.focus {
            Pane::Routes => {
                let routes = self.visible_routes();
                if routes.is_empty() {
                    return;
                }
                let index = step(self.selected_route_index(), routes.len());
                self.selected_route = Some(routes[index].route.clone());
            }
            Pane::Divergences => {
                let list = self.visible_divergences();
                if list.is_empty() {
                    return;
                }
                let index = step(self.selected_divergence_index(), list.len());
                self.selected_divergence = Some(DivergenceRef::of(list[index]));
            }
        }
    }

    /// Enter: a divergence opens its drill-down; a route narrows the divergences to it.
    fn open_selected(&mut self) -> Option<Request> {
        match self.focus {
            Pane::Divergences => {
                let summary = self.selected_divergence()?;
                let (divergence, route) = (DivergenceRef::of(summary), summary.route.clone());
                self.selected_divergence = Some(divergence.clone());
                self.screens.push(Screen::Divergence(DivergenceScreen {
                    divergence: divergence.clone(),
                    route,
                    event: Load::Loading,
                    raw: false,
                    scroll: Scroll::default(),
                }));
                Some(Request::Divergence(divergence))
            }
            Pane::Routes => {
                let route = self.selected_route()?.route.clone();
                self.filter = route;
                self.focus = Pane::Divergences;
                None
            }
        }
    }

    /// `n`: the noise view of the route in view (the open divergence's, else the selected).
    fn open_noise(&mut self) -> Option<Request> {
        let route = match self.screens.last() {
            Some(Screen::Divergence(screen)) => screen.route.clone(),
            Some(Screen::Noise(_)) => return None,
            None => match self.focus {
                Pane::Routes => self.selected_route()?.route.clone(),
                Pane::Divergences => self.selected_divergence()?.route.clone(),
            },
        };
        self.screens.push(Screen::Noise(NoiseScreen {
            route: route.clone(),
            report: NoiseState::Loading,
            scroll: Scroll::default(),
        }));
        Some(Request::Fields(route))
    }
}
