//! The dashboard without a terminal or a network: made-up API answers and keys go in, the
//! screen is drawn on ratatui's `TestBackend` and read back as text. The wait for keys is
//! checked on a pseudo-terminal, which a test can close as a window would be.

use std::{
    fs::File,
    io::{self, Write as _},
    os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
    ptr,
    time::Duration,
};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::{Terminal, backend::TestBackend};
use serde_json::json;

use super::{
    app::{App, Connection, Input, Pane, Screen},
    client::{
        ApiBase, ClientError, DivergenceRef, FieldsReport, Reply, Request, Stats, encode_segment,
        request_timeout,
    },
    terminal::{Keys, wait_for_keys},
    ui,
};
use crate::{
    cluster::FETCH_TIMEOUT,
    event::{Event, EventSummary},
    verdict::Scope,
};

/// A divergence of the node asked, as local lists name it.
fn local(id: u64) -> DivergenceRef {
    DivergenceRef { id, node: None }
}

/// Stats as a proxy-mode node serves them: three routes, one divergent order.
fn stats_json() -> serde_json::Value {
    json!({
        "node": "node-a",
        "mode": "proxy",
        "uptime_s": 125,
        "exchanges": {
            "seen": 1500, "sampled_out": 0, "skipped_unsafe": 3, "truncated": 0,
            "incomplete": 0, "mirrored": 1234, "matched": 1100, "diverged": 120,
            "shadow_errors": 14, "shadow_dropped": 2, "live_errors": 0, "store_dropped": 0,
            "match_rate": 0.9016
        },
        "latency": {
            "live": {"count": 1234, "p50_ms": 1.2, "p90_ms": 3.0, "p99_ms": 9.5},
            "shadow": {"count": 1220, "p50_ms": 1.4, "p90_ms": 3.3, "p99_ms": 12.0}
        },
        "routes": [
            {"route": "GET /users/{id}", "mirrored": 900, "matched": 900, "diverged": 0,
             "shadow_errors": 0, "match_rate": 1.0},
            {"route": "GET /orders/{id}", "mirrored": 200, "matched": 100, "diverged": 100,
             "shadow_errors": 0, "match_rate": 0.5},
            {"route": "GET /profile", "mirrored": 134, "matched": 100, "diverged": 20,
             "shadow_errors": 14, "match_rate": 0.8333}
        ],
        "recent_divergences": [],
        "capture": null
    })
}

fn stats() -> Stats {
    serde_json::from_value(stats_json()).expect("stats JSON reads")
}

fn summaries() -> Vec<EventSummary> {
    serde_json::from_value(json!([
        {"id": 42, "time_ms": 1_700_000_000_000u64, "outcome": "diverged", "method": "GET",
         "target": "/orders/1", "route": "GET /orders/{id}", "live_status": 200,
         "shadow_status": 200, "differences": 1, "paths": ["body:/total"], "error": null},
        {"id": 41, "time_ms": 1_699_999_999_000u64, "outcome": "diverged", "method": "GET",
         "target": "/profile", "route": "GET /profile", "live_status": 200,
         "shadow_status": 200, "differences": 1, "paths": ["body:/beta_features"],
         "error": null},
        {"id": 40, "time_ms": 1_699_999_998_000u64, "outcome": "shadow_error", "method": "GET",
         "target": "/profile", "route": "GET /profile", "live_status": 200,
         "shadow_status": null, "differences": 0, "paths": [],
         "error": "shadow timed out after 2s"}
    ]))
    .expect("summaries read")
}

fn profile_event() -> Event {
    serde_json::from_value(json!({
        "id": 41, "time_ms": 1_699_999_999_000u64, "node": "node-a", "outcome": "diverged",
        "method": "GET", "target": "/profile", "route": "GET /profile", "routing_key": null,
        "live": {"status": 200, "headers": [["content-type", "application/json"]],
                 "body": {"text": "{\"id\":1,\"plan\":\"pro\"}", "base64": false, "size": 21},
                 "latency_ms": 1.25},
        "shadow": {"status": 200, "headers": [["content-type", "application/json"]],
                   "body": {"text": "{\"id\":1,\"plan\":\"pro\",\"beta_features\":true}",
                            "base64": false, "size": 42},
                   "latency_ms": 1.5},
        "differences": [
            {"kind": "body", "path": "/beta_features", "op": "added", "shadow": true},
            {"kind": "body", "path": "/plan", "op": "changed", "live": "pro", "shadow": "max"}
        ],
        "error": null
    }))
    .expect("event reads")
}

/// An app that has had one good refresh.
fn loaded_app() -> App {
    let mut app = App::new("http://127.0.0.1:9090");
    app.update(Input::Reply(Reply::Stats(Ok(Box::new(stats())))));
    app.update(Input::Reply(Reply::Divergences(Ok(summaries()))));
    app
}

fn key(code: KeyCode) -> Input {
    Input::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn press(app: &mut App, code: KeyCode) -> Option<Request> {
    app.update(key(code))
}

fn type_text(app: &mut App, text: &str) {
    for c in text.chars() {
        press(app, KeyCode::Char(c));
    }
}

/// The screen as lines of text.
fn render(app: &App, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test terminal");
    terminal
        .draw(|frame| ui::draw(frame, app))
        .expect("draw on the test backend");
    let buffer = terminal.backend().buffer();
    (0..height)
        .map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect())
        .collect()
}

fn screen_text(app: &App, width: u16, height: u16) -> String {
    render(app, width, height).join("\n")
}

/// The value line of the card titled `title`: the text under the title, up to the border.
fn card_value(lines: &[String], title: &str) -> Option<String> {
    lines.iter().enumerate().find_map(|(row, line)| {
        let byte = line.find(title)?;
        let column = line[..byte].chars().count();
        let below: String = lines.get(row + 1)?.chars().skip(column).collect();
        Some(below.split('│').next().unwrap_or("").trim().to_owned())
    })
}

/// Route names in the order the routes table shows them.
fn route_order(app: &App) -> Vec<String> {
    let text = screen_text(app, 120, 40);
    let mut found: Vec<(usize, String)> = ["GET /users/{id}", "GET /orders/{id}", "GET /profile"]
        .iter()
        .filter_map(|route| {
            // The routes table comes before the divergences pane, so the first hit is the row.
            text.find(&format!(" {route} "))
                .map(|at| (at, (*route).to_owned()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, route)| route).collect()
}

#[test]
fn dashboard_shows_the_counts_at_80x24_and_120x40() {
    let app = loaded_app();
    for (width, height) in [(80, 24), (120, 40)] {
        let lines = render(&app, width, height);
        let text = lines.join("\n");
        assert_eq!(
            card_value(&lines, "Mirrored").as_deref(),
            Some("1234"),
            "{text}"
        );
        assert_eq!(
            card_value(&lines, "Match rate").as_deref(),
            Some("90.2%"),
            "{text}"
        );
        assert_eq!(
            card_value(&lines, "Diverged").as_deref(),
            Some("120"),
            "{text}"
        );
        assert_eq!(
            card_value(&lines, "Shadow errors").as_deref(),
            Some("14"),
            "{text}"
        );
        assert_eq!(
            card_value(&lines, "Capture loss").as_deref(),
            Some(ui::NO_CAPTURE),
            "{text}"
        );
        for route in ["GET /users/{id}", "GET /orders/{id}", "GET /profile"] {
            assert!(
                text.contains(route),
                "{route} missing at {width}x{height}:\n{text}"
            );
        }
        assert!(text.contains("/orders/1"), "{text}");
        assert!(text.contains("body:/total"), "{text}");
        assert!(
            text.contains("q quit"),
            "the key help is on screen:\n{text}"
        );
        assert!(!text.contains("unreachable"), "{text}");
    }
}

#[test]
fn capture_card_shows_ring_drops_and_incomplete_exchanges_in_attach_mode() {
    let mut json = stats_json();
    json["mode"] = json!("attach");
    json["capture"] = json!({"packets": 10, "ring_drops": 7, "exchanges_incomplete": 3});
    let mut app = App::new("http://127.0.0.1:9090");
    app.apply_stats(serde_json::from_value(json).expect("stats read"));

    let lines = render(&app, 80, 24);
    let text = lines.join("\n");
    assert_eq!(
        card_value(&lines, "Capture loss").as_deref(),
        Some("ring drops 7"),
        "{text}"
    );
    assert!(text.contains("incomplete 3"), "{text}");
}

#[test]
fn keys_move_the_selection_and_tab_switches_panes() {
    let mut app = loaded_app();
    assert_eq!(app.focus, Pane::Routes);
    let first = app
        .selected_route()
        .expect("a route is selected")
        .route
        .clone();

    press(&mut app, KeyCode::Char('j'));
    let second = app
        .selected_route()
        .expect("a route is selected")
        .route
        .clone();
    assert_ne!(first, second);
    let text = screen_text(&app, 80, 24);
    assert!(
        text.contains(&format!("> {second}")),
        "highlight on {second}:\n{text}"
    );

    press(&mut app, KeyCode::Up);
    assert_eq!(app.selected_route().expect("selected").route, first);
    press(&mut app, KeyCode::Char('k'));
    assert_eq!(
        app.selected_route().expect("selected").route,
        first,
        "stops at the top"
    );

    press(&mut app, KeyCode::Tab);
    assert_eq!(app.focus, Pane::Divergences);
    press(&mut app, KeyCode::Down);
    assert_eq!(app.selected_divergence().expect("selected").id, 41);

    // A refresh with a newer divergence on top keeps the highlight on the same event.
    let mut newer = summaries();
    let mut top = newer[0].clone();
    top.id = 43;
    newer.insert(0, top);
    app.update(Input::Reply(Reply::Divergences(Ok(newer))));
    assert_eq!(app.selected_divergence().expect("selected").id, 41);
}

#[test]
fn the_cluster_scope_names_members_and_asks_each_divergence_of_its_node() {
    let mut stats = stats_json();
    stats["scope"] = json!("cluster");
    stats["nodes"] = json!([
        {"name": "node-a", "api": "10.0.0.1:9090", "ok": true},
        {"name": "node-b", "api": "10.0.0.2:9090", "ok": true},
        {"name": "node-c", "api": "10.0.0.3:9090", "ok": false,
         "error": "no answer within 2s"}
    ]);
    // Ids are per node: two members may both have a #41.
    let mut list = summaries();
    for summary in &mut list {
        summary.node = Some("node-a".to_owned());
    }
    let mut other = list[1].clone();
    other.node = Some("node-b".to_owned());
    other.target = "/profile?from=b".to_owned();
    list.insert(1, other);

    let mut app = App::new("http://127.0.0.1:9090").in_scope(Scope::Cluster);
    let stats: Stats = serde_json::from_value(stats).expect("stats JSON reads");
    app.update(Input::Reply(Reply::Stats(Ok(Box::new(stats)))));
    app.update(Input::Reply(Reply::Divergences(Ok(list))));

    let text = screen_text(&app, 120, 30);
    assert!(text.contains("cluster of 3"), "{text}");
    assert!(
        text.contains("leave out members that did not answer: node-c (no answer within 2s)"),
        "{text}"
    );
    assert!(text.contains("[node-b] GET /profile?from=b"), "{text}");
    assert!(
        text.contains(ui::CAPTURE_PER_NODE),
        "capture figures are per node:\n{text}"
    );

    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Down);
    press(&mut app, KeyCode::Down);
    let request = press(&mut app, KeyCode::Enter);
    let node_a_41 = DivergenceRef {
        id: 41,
        node: Some("node-a".to_owned()),
    };
    assert_eq!(request, Some(Request::Divergence(node_a_41.clone())));
    assert!(screen_text(&app, 80, 24).contains("loading divergence node-a #41"));

    // node-b's #41 answering does not fill node-a's screen; node-a's does.
    let node_b_41 = DivergenceRef {
        id: 41,
        node: Some("node-b".to_owned()),
    };
    app.update(Input::Reply(Reply::Divergence(
        node_b_41,
        Ok(Box::new(profile_event())),
    )));
    assert!(screen_text(&app, 80, 24).contains("loading divergence node-a #41"));
    app.update(Input::Reply(Reply::Divergence(
        node_a_41,
        Ok(Box::new(profile_event())),
    )));
    let text = screen_text(&app, 120, 40);
    assert!(text.contains("Divergence node-a #41"), "{text}");
    assert!(text.contains("/beta_features"), "{text}");
}

#[test]
fn enter_opens_the_drill_down_with_paths_and_both_values_and_esc_returns() {
    let mut app = loaded_app();
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Char('j'));
    let request = press(&mut app, KeyCode::Enter);
    assert_eq!(request, Some(Request::Divergence(local(41))));
    assert!(screen_text(&app, 80, 24).contains("loading divergence #41"));

    app.update(Input::Reply(Reply::Divergence(
        local(41),
        Ok(Box::new(profile_event())),
    )));
    for (width, height) in [(80, 24), (120, 40)] {
        let text = screen_text(&app, width, height);
        assert!(text.contains("GET /profile"), "{text}");
        assert!(text.contains("live 200 · shadow 200"), "{text}");
        assert!(text.contains("/beta_features"), "{text}");
        assert!(
            text.contains("(absent)"),
            "the live side lacks the added field:\n{text}"
        );
        assert!(text.contains("true"), "{text}");
        assert!(text.contains("/plan"), "{text}");
        assert!(
            text.contains("\"pro\"") && text.contains("\"max\""),
            "{text}"
        );
    }

    // `r` shows the raw bodies, `r` again the fields.
    press(&mut app, KeyCode::Char('r'));
    let text = screen_text(&app, 120, 40);
    assert!(text.contains("Raw responses"), "{text}");
    assert!(
        text.contains("\"beta_features\": true"),
        "pretty-printed shadow body:\n{text}"
    );
    assert!(text.contains("content-type: application/json"), "{text}");
    press(&mut app, KeyCode::Char('r'));
    assert!(screen_text(&app, 120, 40).contains("Differences (2)"));

    press(&mut app, KeyCode::Esc);
    assert!(app.screens.is_empty());
    let text = screen_text(&app, 80, 24);
    assert!(text.contains("Recent divergences"), "{text}");
    press(&mut app, KeyCode::Enter);
    press(&mut app, KeyCode::Char('b'));
    assert!(app.screens.is_empty(), "b goes back too");
}

#[test]
fn long_values_wrap_and_scroll() {
    let mut app = loaded_app();
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Enter);
    // 398 characters whose last 12 are the only place the marker appears.
    let tail = "END-OF-VALUE";
    let long = format!("{}{tail}", "x".repeat(386));
    let mut event = profile_event();
    event.id = 42;
    event.differences = serde_json::from_value(json!([
        {"kind": "body", "path": "/note", "op": "changed", "live": long, "shadow": "short"}
    ]))
    .expect("differences read");
    app.update(Input::Reply(Reply::Divergence(
        local(42),
        Ok(Box::new(event)),
    )));

    let text = screen_text(&app, 120, 40);
    assert!(
        text.contains(tail),
        "the end of a long value is on screen, wrapped:\n{text}"
    );

    // At 80x24 the value runs past the view; scrolling down brings its end into sight.
    let text = screen_text(&app, 80, 24);
    assert!(!text.contains(tail), "{text}");
    for _ in 0..30 {
        press(&mut app, KeyCode::Char('j'));
        screen_text(&app, 80, 24);
    }
    let text = screen_text(&app, 80, 24);
    assert!(text.contains(tail), "scrolled to the end:\n{text}");
    press(&mut app, KeyCode::Char('g'));
    assert!(screen_text(&app, 80, 24).contains("Field"));
}

#[test]
fn s_cycles_the_sort_order_of_the_routes() {
    let mut app = loaded_app();
    // By divergence rate: orders 50%, profile 16.7%, users 0%.
    assert_eq!(
        route_order(&app),
        ["GET /orders/{id}", "GET /profile", "GET /users/{id}"]
    );

    press(&mut app, KeyCode::Char('s'));
    assert_eq!(
        route_order(&app),
        ["GET /users/{id}", "GET /orders/{id}", "GET /profile"],
        "by volume"
    );
    assert!(screen_text(&app, 80, 24).contains("sort: volume"));

    // No node reports a latency ratio yet: the order falls back to volume and says so.
    press(&mut app, KeyCode::Char('s'));
    assert_eq!(
        route_order(&app),
        ["GET /users/{id}", "GET /orders/{id}", "GET /profile"]
    );
    assert!(screen_text(&app, 120, 40).contains("latency ratio (none reported: by volume)"));

    // Once routes carry a ratio, that is the order.
    let mut json = stats_json();
    for (route, ratio) in json["routes"]
        .as_array_mut()
        .expect("routes")
        .iter_mut()
        .zip([1.0, 1.1, 2.5])
    {
        route["latency_ratio"] = json!(ratio);
    }
    app.apply_stats(serde_json::from_value(json).expect("stats read"));
    assert_eq!(
        route_order(&app),
        ["GET /profile", "GET /orders/{id}", "GET /users/{id}"]
    );

    press(&mut app, KeyCode::Char('s'));
    assert_eq!(
        route_order(&app),
        ["GET /orders/{id}", "GET /profile", "GET /users/{id}"],
        "back to divergence rate"
    );
}

#[test]
fn slash_filters_the_routes_enter_applies_and_esc_cancels() {
    let mut app = loaded_app();
    press(&mut app, KeyCode::Char('/'));
    type_text(&mut app, "ORD");
    let text = screen_text(&app, 80, 24);
    assert!(
        text.contains("/ route filter: ORD"),
        "the input is on screen:\n{text}"
    );
    assert_eq!(app.visible_routes().len(), 3, "not applied before Enter");

    press(&mut app, KeyCode::Enter);
    let text = screen_text(&app, 80, 24);
    assert!(text.contains("GET /orders/{id}"), "{text}");
    assert!(!text.contains("GET /users/{id}"), "{text}");
    assert!(!text.contains("GET /profile"), "{text}");
    assert!(text.contains("filter: ORD"), "{text}");
    assert_eq!(app.visible_divergences().len(), 1);

    // Esc while typing keeps the applied filter.
    press(&mut app, KeyCode::Char('/'));
    press(&mut app, KeyCode::Backspace);
    type_text(&mut app, "xyz");
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.filter, "ORD");
    assert!(app.filter_input.is_none());

    // `q` while typing is text, not quit.
    press(&mut app, KeyCode::Char('/'));
    type_text(&mut app, "q");
    assert!(!app.should_quit());
    press(&mut app, KeyCode::Esc);

    // Esc on the dashboard clears the filter.
    press(&mut app, KeyCode::Esc);
    assert!(app.filter.is_empty());
    assert_eq!(app.visible_routes().len(), 3);
}

#[test]
fn enter_on_a_route_narrows_the_divergences_to_it() {
    let mut app = loaded_app();
    // The first route by divergence rate is the orders route.
    assert_eq!(press(&mut app, KeyCode::Enter), None);
    assert_eq!(app.filter, "GET /orders/{id}");
    assert_eq!(app.focus, Pane::Divergences);
    assert_eq!(app.visible_divergences().len(), 1);
}

#[test]
fn unreachable_api_shows_a_banner_until_it_answers_again() {
    let mut app = App::new("http://127.0.0.1:9");
    assert!(screen_text(&app, 80, 24).contains("Connecting"));

    let refused = || ClientError::Unreachable {
        url: "http://127.0.0.1:9/api/stats".to_owned(),
        reason: "connection refused".to_owned(),
    };
    app.update(Input::Reply(Reply::Stats(Err(refused()))));
    app.update(Input::Reply(Reply::Stats(Err(refused()))));
    assert_eq!(
        app.connection,
        Connection::Unreachable {
            error: refused().to_string(),
            failures: 2
        }
    );
    for (width, height) in [(80, 24), (120, 40)] {
        let text = screen_text(&app, width, height);
        assert!(text.contains("API unreachable, retrying"), "{text}");
        assert!(text.contains("q quit"), "{text}");
    }

    app.update(Input::Reply(Reply::Stats(Ok(Box::new(stats())))));
    let text = screen_text(&app, 80, 24);
    assert!(!text.contains("unreachable"), "{text}");
    assert!(text.contains("1234"), "{text}");

    // Losing the API again keeps the last figures on screen, marked stale.
    app.update(Input::Reply(Reply::Stats(Err(refused()))));
    let text = screen_text(&app, 120, 40);
    assert!(
        text.contains("unreachable") && text.contains("1234"),
        "{text}"
    );
    assert!(text.contains("figures are stale"), "{text}");
}

#[test]
fn noise_view_says_when_the_node_has_no_field_classification() {
    let mut app = loaded_app();
    let request = press(&mut app, KeyCode::Char('n'));
    assert_eq!(
        request,
        Some(Request::Fields("GET /orders/{id}".to_owned()))
    );

    app.update(Input::Reply(Reply::Fields(
        "GET /orders/{id}".to_owned(),
        Err(ClientError::Status {
            url: "http://127.0.0.1:9090/api/routes/x/fields".to_owned(),
            status: 404,
            message: "no such endpoint".to_owned(),
        }),
    )));
    let text = screen_text(&app, 80, 24);
    assert!(text.contains(ui::NOISE_NOT_AVAILABLE), "{text}");
    press(&mut app, KeyCode::Esc);
    assert!(app.screens.is_empty());

    // A node that has the endpoint but not the route says so; that is not "not available".
    press(&mut app, KeyCode::Char('n'));
    app.update(Input::Reply(Reply::Fields(
        "GET /orders/{id}".to_owned(),
        Err(ClientError::Status {
            url: "http://127.0.0.1:9090/api/routes/x/fields".to_owned(),
            status: 404,
            message: "no route \"GET /orders/{id}\"; GET /api/routes lists them".to_owned(),
        }),
    )));
    let text = screen_text(&app, 80, 24);
    assert!(!text.contains(ui::NOISE_NOT_AVAILABLE), "{text}");
    assert!(text.contains("no route"), "{text}");
}

#[test]
fn noise_view_lists_classified_fields_when_the_node_serves_them() {
    let mut app = loaded_app();
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Enter);
    // From a drill-down, `n` looks at the divergence's route.
    let request = press(&mut app, KeyCode::Char('n'));
    assert_eq!(
        request,
        Some(Request::Fields("GET /orders/{id}".to_owned()))
    );

    // The shape `GET /api/routes/{route}/fields` serves.
    let report = FieldsReport::from_json(&json!({
        "route": "GET /orders/{id}",
        "compared": 40,
        "noise_learning": "replay",
        "fields": [
            {"kind": "body", "path": "/generated_at", "classification": "noise",
             "severity": "value", "compared": 40, "differed": 40, "rate": 1.0,
             "noise_rate": 1.0, "noise_source": "replay", "noise": {"replay": [40, 40]},
             "z": null, "examples": [], "example_path": "/generated_at"},
            {"kind": "body", "path": "/total", "classification": "divergence",
             "severity": "value", "compared": 40, "differed": 38, "rate": 0.95,
             "noise_rate": 0.0, "z": 12.5, "examples": [41, 42]},
            {"kind": "header", "path": "x-request-id", "classification": "pending",
             "rate": 0.5}
        ]
    }))
    .expect("report reads");
    app.update(Input::Reply(Reply::Fields(
        "GET /orders/{id}".to_owned(),
        Ok(report),
    )));
    for (width, height) in [(80, 24), (120, 40)] {
        let lines = render(&app, width, height);
        let text = lines.join("\n");
        let row = |field: &str| {
            lines
                .iter()
                .find(|l| l.contains(field))
                .unwrap_or_else(|| panic!("no row for {field}:\n{text}"))
                .clone()
        };
        let generated_at = row("/generated_at");
        assert!(
            generated_at.contains("noise") && generated_at.contains("100.0%"),
            "{text}"
        );
        let total = row("/total");
        assert!(
            total.contains("divergence") && total.contains("95.0%"),
            "{text}"
        );
        assert!(total.contains("0.0%"), "the noise rate beside it:\n{text}");
        assert!(row("header x-request-id").contains("pending"), "{text}");
        assert!(text.contains("compared=40"), "{text}");
        assert!(text.contains("z=12.5"), "{text}");
    }
    assert!(matches!(app.screens.last(), Some(Screen::Noise(_))));

    press(&mut app, KeyCode::Esc);
    assert!(
        matches!(app.screens.last(), Some(Screen::Divergence(_))),
        "back to the drill-down"
    );
}

#[test]
fn q_and_ctrl_c_quit() {
    let mut app = loaded_app();
    press(&mut app, KeyCode::Char('q'));
    assert!(app.should_quit());

    let mut app = loaded_app();
    app.update(Input::Key(KeyEvent::new(
        KeyCode::Char('c'),
        KeyModifiers::CONTROL,
    )));
    assert!(app.should_quit());
}

#[test]
fn api_urls_are_normalised_and_https_is_refused() {
    assert_eq!(
        ApiBase::parse("127.0.0.1:9090")
            .expect("host:port")
            .as_str(),
        "http://127.0.0.1:9090"
    );
    assert_eq!(
        ApiBase::parse("http://localhost:9090/")
            .expect("trailing slash")
            .as_str(),
        "http://localhost:9090"
    );
    assert!(ApiBase::parse("https://example.test").is_err());
    assert!(ApiBase::parse("http://").is_err());
}

#[test]
fn route_names_are_percent_encoded_as_one_path_segment() {
    assert_eq!(
        encode_segment("GET /orders/{id}"),
        "GET%20%2Forders%2F%7Bid%7D"
    );
}

#[test]
fn drill_down_marks_differences_on_noise_fields() {
    let mut app = loaded_app();
    press(&mut app, KeyCode::Tab);
    press(&mut app, KeyCode::Enter);
    let mut event = profile_event();
    event.id = 42;
    event.differences = serde_json::from_value(json!([
        {"kind": "body", "path": "/total", "op": "changed", "live": 19.0, "shadow": 19.5,
         "severity": "value"},
        {"kind": "header", "path": "x-request-id", "op": "changed", "live": "a", "shadow": "b",
         "severity": "value", "noise": true}
    ]))
    .expect("differences read");
    app.update(Input::Reply(Reply::Divergence(
        local(42),
        Ok(Box::new(event)),
    )));

    for (width, height) in [(80, 24), (120, 40)] {
        let text = screen_text(&app, width, height);
        assert!(
            text.contains("x-request-id") && text.contains("(noise)"),
            "{text}"
        );
        let total = text
            .lines()
            .find(|l| l.contains("/total"))
            .expect("a /total row");
        assert!(!total.contains("(noise)"), "{text}");
        assert!(total.contains("19.0") && total.contains("19.5"), "{text}");
    }
    let text = screen_text(&app, 120, 40);
    assert!(text.contains("header x-request-id (noise)"), "{text}");
}

#[test]
fn wrapping_breaks_between_words_and_cuts_only_long_ones() {
    assert_eq!(
        ui::wrap("header x-request-id (noise)", 23),
        ["header x-request-id", "(noise)"]
    );
    assert_eq!(ui::wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
    assert_eq!(
        ui::wrap("  \"a\": 1", 20),
        ["  \"a\": 1"],
        "indentation stays"
    );
    assert_eq!(ui::wrap("ab\n\ncd", 5), ["ab", "", "cd"]);
    assert_eq!(ui::wrap("", 5), [""]);
}

#[test]
fn cluster_calls_outlast_the_nodes_own_reads_of_its_members() {
    assert_eq!(request_timeout(Scope::Local), Duration::from_secs(3));
    // In the cluster scope the node asked waits up to FETCH_TIMEOUT for a hung member.
    assert!(
        request_timeout(Scope::Cluster) > FETCH_TIMEOUT,
        "{:?} is not longer than a member read of {FETCH_TIMEOUT:?}",
        request_timeout(Scope::Cluster)
    );
}

/// A pseudo-terminal: the side a terminal window holds, and the side a program reads.
fn pty() -> (File, File) {
    let (mut window, mut program) = (-1, -1);
    // SAFETY: openpty(3) writes two descriptors into the two ints; the name, settings and size
    // pointers may be null.
    let opened = unsafe {
        libc::openpty(
            &raw mut window,
            &raw mut program,
            ptr::null_mut(),
            ptr::null(),
            ptr::null(),
        )
    };
    assert_eq!(opened, 0, "openpty: {}", io::Error::last_os_error());
    // SAFETY: openpty just opened both descriptors, and nothing else owns them.
    unsafe {
        (
            File::from(OwnedFd::from_raw_fd(window)),
            File::from(OwnedFd::from_raw_fd(program)),
        )
    }
}

#[test]
fn a_terminal_whose_window_closed_reads_as_hung_up() {
    let (mut window, program) = pty();
    let wait = |timeout| wait_for_keys(program.as_fd(), timeout).expect("poll the terminal");
    assert_eq!(wait(Duration::from_millis(20)), Keys::Idle);

    // A whole line: a new pseudo-terminal is in canonical mode, not raw like the dashboard's.
    window.write_all(b"q\n").expect("type on the terminal");
    assert_eq!(wait(Duration::from_secs(5)), Keys::Ready);

    drop(window);
    assert_eq!(wait(Duration::from_millis(20)), Keys::HungUp);
}
