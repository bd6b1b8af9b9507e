//! Drawing: paints an [`App`] onto a ratatui frame, and nothing else.
//!
//! Every screen is laid out for 80x24 first (the cards, both lists and the key help fit) and
//! simply gets more rows and wider columns on a bigger terminal. Long values are wrapped here,
//! by characters, so the scrollable views know exactly how many lines they have.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span, Text},
    widgets::{Block, Cell, Paragraph, Row, Table, TableState},
};

use super::{
    app::{App, Connection, DivergenceScreen, Load, NoiseScreen, NoiseState, Pane, Screen},
    client::{FieldsReport, RouteStats, Stats},
};
use crate::{
    event::{DiffKind, Difference, Event, Outcome, StoredResponse},
    verdict::Scope,
};

/// What the capture card says where there is no capture to lose packets.
pub const NO_CAPTURE: &str = "n/a in proxy mode";
/// What the capture card says in the cluster scope: capture figures are not merged.
pub const CAPTURE_PER_NODE: &str = "per node: --scope local";
/// What the noise view says when the node has no field classification endpoint.
pub const NOISE_NOT_AVAILABLE: &str = "noise view: not available from this node yet";

const FOCUSED: Color = Color::Cyan;
const DIM: Style = Style::new().fg(Color::DarkGray);

/// Paints the whole screen.
pub fn draw(frame: &mut Frame, app: &App) {
    let banner_height =
        u16::from(app.connection != Connection::Connected || missing_members(app).is_some());
    let [header, banner, body, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(banner_height),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    draw_header(frame, header, app);
    draw_banner(frame, banner, app);
    match app.screens.last() {
        None => draw_dashboard(frame, body, app),
        Some(Screen::Divergence(screen)) => draw_divergence(frame, body, screen),
        Some(Screen::Noise(screen)) => draw_noise(frame, body, screen),
    }
    draw_help(frame, help, app);
}

fn draw_header(frame: &mut Frame, area: Rect, app: &App) {
    let mut spans = vec![Span::styled(" Specter ", Style::new().bold().reversed())];
    if let Some(stats) = &app.stats {
        let latency = &stats.latency;
        let who = match app.scope {
            Scope::Cluster => format!("cluster of {}", stats.nodes.len()),
            Scope::Local => stats.node.clone(),
        };
        spans.push(Span::raw(format!(
            " {who} · {} mode · up {} · p50 live {:.1} ms / shadow {:.1} ms",
            stats.mode,
            uptime(stats.uptime_s),
            latency.live.p50_ms,
            latency.shadow.p50_ms,
        )));
    }
    spans.push(Span::styled(format!(" · {}", app.api), DIM));
    frame.render_widget(Line::from(spans), area);
}

/// In the cluster scope, the members whose figures could not be read (and so are left out of
/// every total on screen), as a banner line.
fn missing_members(app: &App) -> Option<String> {
    let stats = app.stats.as_ref()?;
    let missing: Vec<String> = stats
        .nodes
        .iter()
        .filter(|node| !node.ok)
        .map(|node| match &node.error {
            Some(error) => format!("{} ({error})", node.name),
            None => node.name.clone(),
        })
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            " Figures leave out members that did not answer: {}",
            missing.join(", ")
        )
    })
}

fn draw_banner(frame: &mut Frame, area: Rect, app: &App) {
    let (text, style) = match &app.connection {
        Connection::Connected => match missing_members(app) {
            Some(text) => (text, Style::new().fg(Color::Black).bg(Color::Yellow)),
            None => return,
        },
        Connection::Connecting => (
            format!(" Connecting to the admin API at {} ...", app.api),
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ),
        Connection::Unreachable { error, failures } => (
            format!(
                " API unreachable, retrying every second ({failures} failed{}): {error}",
                if app.stats.is_some() {
                    "; figures are stale"
                } else {
                    ""
                }
            ),
            Style::new().fg(Color::White).bg(Color::Red).bold(),
        ),
    };
    frame.render_widget(Paragraph::new(text).style(style), area);
}

fn draw_help(frame: &mut Frame, area: Rect, app: &App) {
    if let Some(input) = &app.filter_input {
        let line = Line::from(vec![
            Span::styled(" / route filter: ", Style::new().bold()),
            Span::raw(input.as_str()),
            Span::styled("█", Style::new().fg(FOCUSED)),
            Span::styled("  Enter apply · Esc cancel", DIM),
        ]);
        frame.render_widget(line, area);
        return;
    }
    // Two spaces between keys keep the dashboard's help within 80 columns.
    let keys = match app.screens.last() {
        None => " j/k move  Tab pane  Enter open  / filter  s sort  n noise  Esc clear  q quit",
        Some(Screen::Divergence(_)) => " j/k scroll  r raw bodies  n noise  Esc/b back  q quit",
        Some(Screen::Noise(_)) => " j/k scroll  Esc/b back  q quit",
    };
    frame.render_widget(Line::styled(keys, DIM.reversed()), area);
}

fn draw_dashboard(frame: &mut Frame, area: Rect, app: &App) {
    let [cards, routes, divergences] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Percentage(45),
        Constraint::Fill(1),
    ])
    .areas(area);
    draw_cards(frame, cards, app.stats.as_ref(), app.scope);
    draw_routes(frame, routes, app);
    draw_divergences(frame, divergences, app);
}

/// The headline figures, one bordered card each.
fn draw_cards(frame: &mut Frame, area: Rect, stats: Option<&Stats>, scope: Scope) {
    let areas: [Rect; 5] = Layout::horizontal([
        Constraint::Fill(3),
        Constraint::Fill(3),
        Constraint::Fill(3),
        Constraint::Fill(3),
        Constraint::Fill(4),
    ])
    .areas(area);

    let dash = || "–".to_owned();
    let cards: [(&str, String, String); 5] = match stats {
        None => std::array::from_fn(|i| {
            let title = [
                "Mirrored",
                "Match rate",
                "Diverged",
                "Shadow errors",
                "Capture loss",
            ][i];
            (title, dash(), String::new())
        }),
        Some(stats) => {
            let e = &stats.exchanges;
            let compared = e.matched + e.diverged;
            let (loss, loss_detail) = match &stats.capture {
                None if scope == Scope::Cluster => (CAPTURE_PER_NODE.to_owned(), String::new()),
                None => (NO_CAPTURE.to_owned(), String::new()),
                Some(c) => (
                    format!("ring drops {}", c.ring_drops),
                    format!("incomplete {}", c.exchanges_incomplete),
                ),
            };
            [
                (
                    "Mirrored",
                    e.mirrored.to_string(),
                    format!("seen {}", e.seen),
                ),
                (
                    "Match rate",
                    e.match_rate.map_or_else(dash, percent),
                    format!("matched {}", e.matched),
                ),
                (
                    "Diverged",
                    e.diverged.to_string(),
                    if compared > 0 {
                        format!("rate {}", percent(e.diverged as f64 / compared as f64))
                    } else {
                        String::new()
                    },
                ),
                (
                    "Shadow errors",
                    e.shadow_errors.to_string(),
                    format!("dropped {}", e.shadow_dropped),
                ),
                ("Capture loss", loss, loss_detail),
            ]
        }
    };

    for (area, (title, value, detail)) in areas.into_iter().zip(cards) {
        let text = Text::from(vec![
            Line::styled(value, Style::new().bold()),
            Line::styled(detail, DIM),
        ]);
        let card = Paragraph::new(text).block(Block::bordered().title(title));
        frame.render_widget(card, area);
    }
}

fn pane_block(title: String, focused: bool) -> Block<'static> {
    let style = if focused {
        Style::new().fg(FOCUSED)
    } else {
        Style::new()
    };
    Block::bordered()
        .title(Span::styled(title, style.add_modifier(Modifier::BOLD)))
        .border_style(style)
}

fn draw_routes(frame: &mut Frame, area: Rect, app: &App) {
    let sort = if app.effective_sort() == app.sort {
        app.sort.label().to_owned()
    } else {
        format!(
            "{} (none reported: by {})",
            app.sort.label(),
            app.effective_sort().label()
        )
    };
    let mut title = format!(" Routes · sort: {sort} ");
    if !app.filter.is_empty() {
        title.push_str(&format!("· filter: {} ", app.filter));
    }
    let block = pane_block(title, app.focus == Pane::Routes);

    let routes = app.visible_routes();
    if routes.is_empty() {
        let text = if app.stats.is_none() {
            "waiting for the first answer from the API"
        } else if app.filter.is_empty() {
            "no routes yet: nothing was mirrored"
        } else {
            "no route matches the filter (Esc clears it)"
        };
        frame.render_widget(Paragraph::new(text).style(DIM).block(block), area);
        return;
    }

    let rows = routes.iter().map(|r| {
        Row::new(vec![
            Cell::from(r.route.clone()),
            Cell::from(r.mirrored.to_string()),
            Cell::from(r.diverged.to_string()),
            Cell::from(r.shadow_errors.to_string()),
            Cell::from(r.divergence_rate().map_or_else(|| "–".to_owned(), percent)),
            latency_cell(r),
        ])
    });
    let header = Row::new(["Route", "Mirrored", "Diverged", "Errors", "Div%", "Lat×"])
        .style(Style::new().bold().underlined());
    let table = Table::new(
        rows,
        [
            Constraint::Fill(1),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(6),
        ],
    )
    .header(header)
    .block(block)
    .row_highlight_style(highlight(app.focus == Pane::Routes))
    .highlight_symbol("> ");
    let mut state = TableState::new().with_selected(app.selected_route_index());
    frame.render_stateful_widget(table, area, &mut state);
}

/// The route's shadow/live latency ratio, red when the node judges the shadow too slow.
fn latency_cell(route: &RouteStats) -> Cell<'static> {
    let Some(ratio) = route.latency_ratio else {
        return Cell::from("–");
    };
    let style = if route.shadow_slower {
        Style::new().fg(Color::Red).bold()
    } else {
        Style::new()
    };
    Cell::from(format!("{ratio:.2}")).style(style)
}

fn draw_divergences(frame: &mut Frame, area: Rect, app: &App) {
    let list = app.visible_divergences();
    let mut title = format!(" Recent divergences ({}) ", list.len());
    if !app.filter.is_empty() {
        title.push_str(&format!("· filter: {} ", app.filter));
    }
    let block = pane_block(title, app.focus == Pane::Divergences);

    if list.is_empty() {
        let text = match &app.list_error {
            Some(error) => format!("cannot list divergences: {error}"),
            None if app.filter.is_empty() => "no divergences recorded".to_owned(),
            None => "no divergence on the routes the filter lets through".to_owned(),
        };
        frame.render_widget(Paragraph::new(text).style(DIM).block(block), area);
        return;
    }

    let rows = list.iter().map(|d| {
        let outcome = match d.outcome {
            Outcome::Diverged => Span::styled("diverged", Style::new().fg(Color::Yellow)),
            Outcome::ShadowError => Span::styled("error", Style::new().fg(Color::Red)),
            Outcome::Matched => Span::raw("matched"),
        };
        let status = match d.shadow_status {
            Some(shadow) => format!("{}/{}", d.live_status, shadow),
            None => format!("{}/–", d.live_status),
        };
        let fields = match &d.error {
            Some(error) if d.paths.is_empty() => error.clone(),
            _ => d.paths.join(", "),
        };
        let request = match &d.node {
            Some(node) => format!("[{node}] {} {}", d.method, d.target),
            None => format!("{} {}", d.method, d.target),
        };
        Row::new(vec![
            Line::raw(clock(d.time_ms)),
            Line::from(outcome),
            Line::raw(request),
            Line::raw(status),
            Line::raw(fields),
        ])
    });
    let header = Row::new(["Time UTC", "Outcome", "Request", "Status", "Fields"])
        .style(Style::new().bold().underlined());
    let table = Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Fill(3),
            Constraint::Length(7),
            Constraint::Fill(2),
        ],
    )
    .header(header)
    .block(block)
    .row_highlight_style(highlight(app.focus == Pane::Divergences))
    .highlight_symbol("> ");
    let mut state = TableState::new().with_selected(app.selected_divergence_index());
    frame.render_stateful_widget(table, area, &mut state);
}

fn highlight(focused: bool) -> Style {
    if focused {
        Style::new().bg(Color::DarkGray).fg(Color::White).bold()
    } else {
        Style::new().add_modifier(Modifier::BOLD)
    }
}

fn draw_divergence(frame: &mut Frame, area: Rect, screen: &DivergenceScreen) {
    let event = match &screen.event {
        Load::Loaded(event) => event,
        Load::Loading => {
            let text = format!("loading divergence {} ...", screen.divergence.label());
            frame.render_widget(Paragraph::new(text).block(Block::bordered()), area);
            return;
        }
        Load::Failed(error) => {
            let text = format!(
                "cannot load divergence {}: {error}",
                screen.divergence.label()
            );
            let paragraph = Paragraph::new(wrap_lines(&text, area.width.saturating_sub(2)))
                .style(Style::new().fg(Color::Red))
                .block(Block::bordered());
            frame.render_widget(paragraph, area);
            return;
        }
    };

    let summary = summary_lines(event);
    let summary_height = u16::try_from(summary.len()).unwrap_or(u16::MAX) + 2;
    let [top, rest] =
        Layout::vertical([Constraint::Length(summary_height), Constraint::Fill(1)]).areas(area);
    let title = format!(" Divergence {} ", screen.divergence.label());
    frame.render_widget(
        Paragraph::new(summary).block(Block::bordered().title(title)),
        top,
    );

    let inner_width = rest.width.saturating_sub(2);
    let (title, lines) = if screen.raw {
        (
            " Raw responses · r for fields ".to_owned(),
            raw_lines(event, inner_width),
        )
    } else {
        (
            format!(
                " Differences ({}) · r for raw bodies ",
                event.differences.len()
            ),
            difference_lines(&event.differences, inner_width),
        )
    };
    draw_scrolled(frame, rest, title, lines, &screen.scroll);
}

/// A bordered view of pre-wrapped lines at the screen's scroll offset.
fn draw_scrolled(
    frame: &mut Frame,
    area: Rect,
    title: String,
    lines: Vec<Line<'static>>,
    scroll: &super::app::Scroll,
) {
    let visible = usize::from(area.height.saturating_sub(2));
    scroll.set_bounds(lines.len(), visible);
    let offset = scroll.offset();
    let more = lines.len().saturating_sub(usize::from(offset) + visible);
    let mut block = Block::bordered().title(title);
    if offset > 0 || more > 0 {
        block = block.title_bottom(Line::styled(
            format!(
                " line {} of {} · {} more ",
                usize::from(offset) + 1,
                lines.len(),
                more
            ),
            DIM,
        ));
    }
    frame.render_widget(Paragraph::new(lines).block(block).scroll((offset, 0)), area);
}

fn summary_lines(event: &Event) -> Vec<Line<'static>> {
    let outcome = match event.outcome {
        Outcome::Diverged => Span::styled("diverged", Style::new().fg(Color::Yellow).bold()),
        Outcome::ShadowError => Span::styled("shadow error", Style::new().fg(Color::Red).bold()),
        Outcome::Matched => Span::raw("matched"),
    };
    let shadow_status = event
        .shadow
        .as_ref()
        .map_or_else(|| "none".to_owned(), |s| s.status.to_string());
    let shadow_latency = event
        .shadow
        .as_ref()
        .map_or_else(|| "–".to_owned(), |s| format!("{:.1} ms", s.latency_ms));

    let mut lines = vec![
        Line::from(vec![
            Span::styled(
                format!("{} {}", event.method, event.target),
                Style::new().bold(),
            ),
            Span::raw("  "),
            outcome,
            Span::styled(format!("  {} UTC", clock(event.time_ms)), DIM),
        ]),
        Line::from(vec![
            Span::styled("route  ", DIM),
            Span::raw(event.route.clone()),
        ]),
        Line::from(vec![
            Span::styled("status ", DIM),
            Span::raw(format!(
                "live {} · shadow {shadow_status}",
                event.live.status
            )),
            Span::styled("   latency ", DIM),
            Span::raw(format!(
                "live {:.1} ms · shadow {shadow_latency}",
                event.live.latency_ms
            )),
        ]),
    ];
    if let Some(error) = &event.error {
        lines.push(Line::styled(
            format!("shadow error: {error}"),
            Style::new().fg(Color::Red),
        ));
    }
    lines
}

/// The differing fields side by side: field, live value, shadow value, each wrapped to its
/// column so long values stay readable.
fn difference_lines(differences: &[Difference], width: u16) -> Vec<Line<'static>> {
    if differences.is_empty() {
        return vec![Line::styled("no field differences recorded", DIM)];
    }
    let width = usize::from(width);
    // Two separators of 3 columns; the field column gets 30%, the values share the rest.
    let field_width = (width * 3 / 10).max(10);
    let value_width = (width.saturating_sub(field_width + 6) / 2).max(8);

    let bold = Style::new().bold();
    let mut lines = columns(&[
        ("Field", field_width, bold),
        ("Live", value_width, bold),
        ("Shadow", value_width, bold),
    ]);
    for difference in differences {
        lines.push(Line::styled("─".repeat(width), DIM));
        // A difference on a field classified as noise is stored but does not count: it is
        // shown, marked and dimmed, so the user sees why the exchange may still have matched.
        let (field, field_style) = if difference.noise {
            (format!("{} (noise)", field_label(difference)), DIM)
        } else {
            (field_label(difference), Style::new().fg(Color::Cyan))
        };
        let live = side_value(difference.live.as_ref());
        let shadow = side_value(difference.shadow.as_ref());
        lines.extend(columns(&[
            (&field, field_width, field_style),
            (&live, value_width, Style::new().fg(Color::Green)),
            (&shadow, value_width, Style::new().fg(Color::Magenta)),
        ]));
    }
    lines
}

/// Cells side by side, each wrapped to its width and padded, as many lines as the tallest.
fn columns(cells: &[(&str, usize, Style)]) -> Vec<Line<'static>> {
    let wrapped: Vec<Vec<String>> = cells.iter().map(|(text, w, _)| wrap(text, *w)).collect();
    let height = wrapped.iter().map(Vec::len).max().unwrap_or(1);
    (0..height)
        .map(|i| {
            let mut spans = Vec::with_capacity(cells.len() * 2);
            for (column, (_, w, style)) in cells.iter().enumerate() {
                if column > 0 {
                    spans.push(Span::styled(" │ ", DIM));
                }
                let piece = wrapped[column].get(i).map_or("", String::as_str);
                spans.push(Span::styled(format!("{piece:<w$}"), *style));
            }
            Line::from(spans)
        })
        .collect()
}

fn field_label(difference: &Difference) -> String {
    match difference.kind {
        DiffKind::Status => "status".to_owned(),
        DiffKind::Header => format!("header {}", difference.path),
        DiffKind::Body if difference.path.is_empty() => "body (whole)".to_owned(),
        DiffKind::Body => difference.path.clone(),
    }
}

fn side_value(value: Option<&serde_json::Value>) -> String {
    match value {
        None => "(absent)".to_owned(),
        Some(serde_json::Value::String(text)) => format!("{text:?}"),
        Some(other) => other.to_string(),
    }
}

/// Both responses in full: status, headers and body; JSON bodies pretty-printed.
fn raw_lines(event: &Event, width: u16) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    let mut side = |name: &str, response: Option<&StoredResponse>, color: Color| {
        let heading = match response {
            Some(r) => format!(
                "── {name} · {} · {} bytes · {:.1} ms ",
                r.status, r.body.size, r.latency_ms
            ),
            None => format!("── {name} · no response "),
        };
        let rule = "─".repeat(usize::from(width).saturating_sub(heading.chars().count()));
        lines.push(Line::styled(
            format!("{heading}{rule}"),
            Style::new().fg(color).bold(),
        ));
        let Some(response) = response else {
            return;
        };
        for (name, value) in &response.headers {
            for piece in wrap(&format!("{name}: {value}"), usize::from(width)) {
                lines.push(Line::styled(piece, DIM));
            }
        }
        lines.push(Line::raw(""));
        let body = &response.body;
        if body.base64 {
            lines.push(Line::styled("(not UTF-8: shown as base64)", DIM));
        }
        let text = serde_json::from_str::<serde_json::Value>(&body.text)
            .ok()
            .filter(|v| v.is_object() || v.is_array())
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| body.text.clone());
        if text.is_empty() {
            lines.push(Line::styled("(empty body)", DIM));
        }
        for piece in wrap_lines_owned(&text, width) {
            lines.push(Line::raw(piece));
        }
        lines.push(Line::raw(""));
    };
    side("live", Some(&event.live), Color::Green);
    side("shadow", event.shadow.as_ref(), Color::Magenta);
    lines
}

fn draw_noise(frame: &mut Frame, area: Rect, screen: &NoiseScreen) {
    let title = format!(" Noise · {} ", screen.route);
    let width = area.width.saturating_sub(2);
    let lines: Vec<Line<'static>> = match &screen.report {
        NoiseState::Loading => vec![Line::raw("loading the route's field classification ...")],
        NoiseState::NotAvailable(detail) => {
            let mut lines = vec![Line::styled(NOISE_NOT_AVAILABLE, Style::new().bold())];
            lines.extend(wrap_lines(detail, width).into_iter().map(|l| l.style(DIM)));
            lines
        }
        NoiseState::Failed(error) => wrap_lines(error, width)
            .into_iter()
            .map(|l| l.style(Style::new().fg(Color::Red)))
            .collect(),
        NoiseState::Loaded(report) => noise_lines(report, width),
    };
    draw_scrolled(frame, area, title, lines, &screen.scroll);
}

/// The classified fields of a route: one row each, its other figures dimmed beneath.
fn noise_lines(report: &FieldsReport, width: u16) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    if !report.summary.is_empty() {
        let summary = report.summary.join(" · ");
        lines.extend(
            wrap_lines(&summary, width)
                .into_iter()
                .map(|l| l.style(DIM)),
        );
    }
    if report.fields.is_empty() {
        lines.push(Line::styled("no fields classified on this route yet", DIM));
        return lines;
    }

    let (class_width, rate_width, severity_width) = (11, 6, 8);
    // Four separators of 3 columns between five columns.
    let field_width =
        usize::from(width).saturating_sub(class_width + 2 * rate_width + severity_width + 12);
    let field_width = field_width.max(10);
    let bold = Style::new().bold();
    lines.extend(columns(&[
        ("Field", field_width, bold),
        ("Class", class_width, bold),
        ("Diff", rate_width, bold),
        ("Noise", rate_width, bold),
        ("Severity", severity_width, bold),
    ]));
    for field in &report.fields {
        let class_style = match field.class.as_str() {
            "noise" => DIM,
            "divergence" => Style::new().fg(Color::Yellow),
            _ => Style::new(),
        };
        let rate = |rate: Option<f64>| rate.map_or_else(|| "–".to_owned(), percent);
        lines.extend(columns(&[
            (&field.field, field_width, Style::new().fg(Color::Cyan)),
            (&field.class, class_width, class_style),
            (&rate(field.rate), rate_width, Style::new()),
            (&rate(field.noise_rate), rate_width, Style::new()),
            (&field.severity, severity_width, Style::new()),
        ]));
        if !field.details.is_empty() {
            let details = format!("  {}", field.details.join(" · "));
            lines.extend(
                wrap_lines(&details, width)
                    .into_iter()
                    .map(|l| l.style(DIM)),
            );
        }
    }
    lines
}

/// Splits `text` into lines of at most `width` characters, keeping its own line breaks. Lines
/// break between words where they can; a word longer than the width (a URL, a JSON value
/// without spaces) is cut. Leading spaces stay, so pretty-printed JSON keeps its indentation.
pub(super) fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut pieces = Vec::new();
    for line in text.split('\n') {
        let mut current = String::new();
        let mut length = 0;
        let mut started = false;
        for word in line.split(' ') {
            let word_length = word.chars().count();
            let separator = usize::from(started);
            if length + separator + word_length <= width {
                if started {
                    current.push(' ');
                }
                current.push_str(word);
                length += separator + word_length;
                started = true;
                continue;
            }

            if length > 0 {
                pieces.push(std::mem::take(&mut current));
                length = 0;
            }
            let chars: Vec<char> = word.chars().collect();
            let mut chunks = chars.chunks(width).peekable();
            while let Some(chunk) = chunks.next() {
                if chunks.peek().is_some() {
                    pieces.push(chunk.iter().collect());
                } else {
                    current = chunk.iter().collect();
                    length = chunk.len();
                }
            }
            started = true;
        }
        pieces.push(current);
    }
    pieces
}

fn wrap_lines_owned(text: &str, width: u16) -> Vec<String> {
    wrap(text, usize::from(width))
}

fn wrap_lines(text: &str, width: u16) -> Vec<Line<'static>> {
    wrap_lines_owned(text, width)
        .into_iter()
        .map(Line::raw)
        .collect()
}

fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

/// `HH:MM:SS` of a Unix time in milliseconds, in UTC.
fn clock(time_ms: u64) -> String {
    let seconds = time_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

fn uptime(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds / 60 % 60),
    }
}
