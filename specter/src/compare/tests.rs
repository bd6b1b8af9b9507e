use std::io::Write as _;

use bytes::Bytes;
use flate2::{
    Compression,
    write::{DeflateEncoder, GzEncoder, ZlibEncoder},
};
use serde_json::json;

use super::*;

fn response(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Response {
    Response {
        status,
        headers: Headers(
            headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), Bytes::copy_from_slice(value.as_bytes())))
                .collect(),
        ),
        body: body.into(),
    }
}

fn json_response(body: &str) -> Response {
    response(
        200,
        &[("content-type", "application/json")],
        body.to_owned(),
    )
}

fn diff(live: &Response, shadow: &Response) -> Vec<Difference> {
    compare(live, shadow, &CompareOptions::default())
}

fn diff_bodies(live: &str, shadow: &str) -> Vec<Difference> {
    diff(&json_response(live), &json_response(shadow))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn raw_deflate(data: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn brotli_compress(data: &[u8]) -> Vec<u8> {
    let mut output = Vec::new();
    {
        let mut writer = brotli::CompressorWriter::new(&mut output, 4096, 5, 22);
        writer.write_all(data).unwrap();
    }
    output
}

fn body_difference(
    path: &str,
    op: DiffOp,
    live: Option<Value>,
    shadow: Option<Value>,
) -> Difference {
    Difference {
        kind: DiffKind::Body,
        path: path.to_owned(),
        op,
        severity: severity(DiffKind::Body, op, live.as_ref(), shadow.as_ref()),
        live,
        shadow,
        noise: false,
    }
}

const USER: &str =
    r#"{"user":{"name":"Ada","address":{"city":"London","zip":"N1"}},"items":[1,2,3]}"#;

#[test]
fn identical_responses_match() {
    let live = response(
        200,
        &[("content-type", "application/json"), ("x-app", "1")],
        USER,
    );
    assert_eq!(diff(&live, &live.clone()), vec![]);
}

#[test]
fn status_change_is_reported_with_both_codes() {
    let live = response(200, &[], "ok");
    let shadow = response(500, &[], "ok");

    assert_eq!(
        diff(&live, &shadow),
        vec![Difference {
            kind: DiffKind::Status,
            path: String::new(),
            op: DiffOp::Changed,
            live: Some(json!(200)),
            shadow: Some(json!(500)),
            severity: Severity::Status,
            noise: false,
        }]
    );
}

#[test]
fn date_and_request_id_differences_are_ignored() {
    let live = response(
        200,
        &[
            ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("X-Request-Id", "abc"),
            ("Content-Length", "2"),
        ],
        "ok",
    );
    let shadow = response(
        200,
        &[
            ("date", "Mon, 01 Jan 2024 00:00:07 GMT"),
            ("x-request-id", "def"),
            ("content-length", "2"),
        ],
        "ok",
    );

    assert_eq!(diff(&live, &shadow), vec![]);
}

#[test]
fn ignored_headers_follow_the_options() {
    let live = response(200, &[("Date", "Mon, 01 Jan 2024 00:00:00 GMT")], "ok");
    let shadow = response(200, &[("Date", "Mon, 01 Jan 2024 00:00:07 GMT")], "ok");
    let options = CompareOptions {
        volatile_headers: vec![],
        ..CompareOptions::default()
    };

    assert!(CompareOptions::default().ignores("X-REQUEST-ID"));
    assert!(!options.ignores("date"));
    assert_eq!(compare(&live, &shadow, &options)[0].path, "date");
}

#[test]
fn set_cookie_fields_are_compared_as_an_ordered_list() {
    let live = response(200, &[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], "ok");
    let shadow = response(200, &[("set-cookie", "a=1; Secure")], "ok");

    assert_eq!(
        diff(&live, &shadow),
        vec![Difference {
            kind: DiffKind::Header,
            path: "set-cookie".to_owned(),
            op: DiffOp::Changed,
            live: Some(json!(["a=1", "b=2"])),
            shadow: Some(json!(["a=1; Secure"])),
            severity: Severity::Value,
            noise: false,
        }]
    );

    // The same cookies in another order are a difference too: order is kept, never folded.
    let swapped = response(200, &[("Set-Cookie", "b=2"), ("Set-Cookie", "a=1")], "ok");
    assert_eq!(diff(&live, &swapped).len(), 1);
}

#[test]
fn header_on_one_side_only_is_added_or_removed() {
    let live = response(200, &[("Cache-Control", "no-store")], "ok");
    let shadow = response(200, &[("X-New", "yes")], "ok");

    assert_eq!(
        diff(&live, &shadow),
        vec![
            Difference {
                kind: DiffKind::Header,
                path: "cache-control".to_owned(),
                op: DiffOp::Removed,
                live: Some(json!(["no-store"])),
                shadow: None,
                severity: Severity::Schema,
                noise: false,
            },
            Difference {
                kind: DiffKind::Header,
                path: "x-new".to_owned(),
                op: DiffOp::Added,
                live: None,
                shadow: Some(json!(["yes"])),
                severity: Severity::Addition,
                noise: false,
            },
        ]
    );
}

#[test]
fn gzip_body_matches_identity_body_with_the_same_json() {
    let live = response(200, &[("Content-Length", "80")], USER);
    let shadow = response(
        200,
        &[("Content-Encoding", "gzip"), ("Content-Length", "77")],
        gzip(USER.as_bytes()),
    );

    assert_eq!(diff(&live, &shadow), vec![]);
    assert_eq!(diff(&shadow, &live), vec![]);
}

#[test]
fn deflate_bodies_match_in_zlib_and_raw_form() {
    let live = response(200, &[], USER);
    let zlib_shadow = response(
        200,
        &[("Content-Encoding", "deflate")],
        zlib(USER.as_bytes()),
    );
    let raw_shadow = response(
        200,
        &[("Content-Encoding", "deflate")],
        raw_deflate(USER.as_bytes()),
    );

    assert_eq!(diff(&live, &zlib_shadow), vec![]);
    assert_eq!(diff(&live, &raw_shadow), vec![]);
}

#[test]
fn brotli_zstd_and_stacked_codings_are_decoded() {
    let live = response(200, &[], USER);
    let br = response(
        200,
        &[("Content-Encoding", "br")],
        brotli_compress(USER.as_bytes()),
    );
    let zstd_body = zstd::encode_all(USER.as_bytes(), 3).unwrap();
    let zstd = response(200, &[("Content-Encoding", "zstd")], zstd_body);
    // Codings are listed in the order applied: deflate first, then gzip around it.
    let stacked = response(
        200,
        &[
            ("Content-Encoding", "deflate"),
            ("Content-Encoding", "identity, GZIP"),
        ],
        gzip(&zlib(USER.as_bytes())),
    );

    assert_eq!(diff(&live, &br), vec![]);
    assert_eq!(diff(&live, &zstd), vec![]);
    assert_eq!(diff(&live, &stacked), vec![]);
}

#[test]
fn encoded_bodies_with_different_content_still_differ() {
    let live = response(200, &[("Content-Encoding", "gzip")], gzip(br#"{"a":1}"#));
    let shadow = response(
        200,
        &[("Content-Encoding", "br")],
        brotli_compress(br#"{"a":2}"#),
    );

    assert_eq!(
        diff(&live, &shadow),
        vec![body_difference(
            "/a",
            DiffOp::Changed,
            Some(json!(1)),
            Some(json!(2))
        )]
    );
}

#[test]
fn empty_body_labelled_gzip_is_not_a_decode_failure() {
    // A response to HEAD names its coding but has no body.
    let live = response(200, &[("Content-Encoding", "gzip")], "");
    let shadow = response(200, &[], "");

    assert_eq!(diff(&live, &shadow), vec![]);
}

#[test]
fn object_key_order_is_ignored() {
    assert_eq!(
        diff_bodies(
            r#"{"a":1,"b":{"c":2,"d":3}}"#,
            r#"{"b":{"d":3,"c":2},"a":1}"#
        ),
        vec![]
    );
}

#[test]
fn numbers_equal_in_value_match_whatever_their_notation() {
    assert_eq!(diff_bodies(r#"{"n":1}"#, r#"{"n":1.0}"#), vec![]);
    assert_eq!(diff_bodies(r#"{"n":1.0}"#, r#"{"n":1e0}"#), vec![]);
    assert_eq!(diff_bodies(r#"{"n":1}"#, r#"{"n":10E-1}"#), vec![]);
    assert_eq!(diff_bodies(r#"{"n":1}"#, r#"{"n":1.5}"#).len(), 1);
}

#[test]
fn huge_numbers_compare_without_panicking() {
    let live =
        r#"[18446744073709551615, -9223372036854775808, 1e308, 123456789012345678901234567890]"#;
    let shadow = r#"[-1, -9223372036854775808, 1e308, 123456789012345678901234567890]"#;

    assert_eq!(
        diff_bodies(live, shadow),
        vec![body_difference(
            "/0",
            DiffOp::Changed,
            Some(json!(u64::MAX)),
            Some(json!(-1))
        )]
    );
    // Out of the f64 range: not JSON to the parser, so compared as bytes.
    assert_eq!(diff_bodies("[1e400]", "[2e400]").len(), 1);
}

#[test]
fn nested_field_change_is_reported_with_its_pointer_and_both_values() {
    let shadow = USER.replace("N1", "E2");

    assert_eq!(
        diff_bodies(USER, &shadow),
        vec![body_difference(
            "/user/address/zip",
            DiffOp::Changed,
            Some(json!("N1")),
            Some(json!("E2"))
        )]
    );
}

#[test]
fn field_present_on_one_side_only_is_added_or_removed() {
    assert_eq!(
        diff_bodies(
            r#"{"user":{"name":"Ada"}}"#,
            r#"{"user":{"name":"Ada","admin":true}}"#
        ),
        vec![body_difference(
            "/user/admin",
            DiffOp::Added,
            None,
            Some(json!(true))
        )]
    );
    assert_eq!(
        diff_bodies(r#"{"a":1,"b":{"c":[1]}}"#, r#"{"a":1}"#),
        vec![body_difference(
            "/b",
            DiffOp::Removed,
            Some(json!({"c": [1]})),
            None
        )]
    );
}

#[test]
fn arrays_are_compared_by_position() {
    assert_eq!(
        diff_bodies(r#"{"items":[1,2,3]}"#, r#"{"items":[1,2]}"#),
        vec![body_difference(
            "/items/2",
            DiffOp::Removed,
            Some(json!(3)),
            None
        )]
    );
    assert_eq!(
        diff_bodies(r#"[1,2]"#, r#"[2,1,{"x":0}]"#),
        vec![
            body_difference("/0", DiffOp::Changed, Some(json!(1)), Some(json!(2))),
            body_difference("/1", DiffOp::Changed, Some(json!(2)), Some(json!(1))),
            body_difference("/2", DiffOp::Added, None, Some(json!({"x": 0}))),
        ]
    );
}

#[test]
fn pointer_tokens_escape_slash_and_tilde() {
    let differences = diff_bodies(r#"{"a/b":1,"m~n":{"~/":1}}"#, r#"{"a/b":2,"m~n":{"~/":2}}"#);
    let paths: Vec<&str> = differences.iter().map(|d| d.path.as_str()).collect();

    assert_eq!(paths, ["/a~1b", "/m~0n/~0~1"]);
}

#[test]
fn a_value_whose_type_changes_is_reported_as_type_changed_with_both_values() {
    assert_eq!(
        diff_bodies(r#"{"id":42}"#, r#"{"id":"42"}"#),
        vec![body_difference(
            "/id",
            DiffOp::TypeChanged,
            Some(json!(42)),
            Some(json!("42"))
        )]
    );
    assert_eq!(
        diff_bodies(r#"{"tags":[]}"#, r#"{"tags":{}}"#),
        vec![body_difference(
            "/tags",
            DiffOp::TypeChanged,
            Some(json!([])),
            Some(json!({}))
        )]
    );
    let differences = diff_bodies(r#"{"n":null}"#, r#"{"n":0}"#);
    assert_eq!(differences[0].op, DiffOp::TypeChanged);
    assert_eq!(differences[0].severity, Severity::Schema);
}

#[test]
fn different_text_bodies_report_size_hash_and_first_differing_line() {
    let live = response(
        200,
        &[("content-type", "text/html")],
        "<html>\n<p>Hello</p>\n</html>\n",
    );
    let shadow = response(
        200,
        &[("content-type", "text/html")],
        "<html>\n<p>Hallo</p>\n</html>\n",
    );

    let differences = diff(&live, &shadow);

    assert_eq!(differences.len(), 1);
    let difference = &differences[0];
    assert_eq!(
        (difference.kind, difference.path.as_str(), difference.op),
        (DiffKind::Body, "", DiffOp::Changed)
    );
    let live_summary = difference.live.as_ref().unwrap();
    let shadow_summary = difference.shadow.as_ref().unwrap();
    assert_eq!(live_summary["size"], json!(live.body.len()));
    assert_eq!(
        live_summary["xxh3"],
        json!(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&live.body)))
    );
    assert_ne!(live_summary["xxh3"], shadow_summary["xxh3"]);
    assert_eq!(live_summary["first_difference_line"], json!(2));
    assert_eq!(shadow_summary["first_difference_line"], json!(2));
    assert_eq!(live_summary["first_difference_column"], json!(5));
    assert_eq!(live_summary["context"], json!("<p>Hello</p>"));
    assert_eq!(shadow_summary["context"], json!("<p>Hallo</p>"));
}

#[test]
fn long_line_context_shows_the_change_within_200_characters() {
    let live = format!("{}X{}", "a".repeat(1000), "b".repeat(1000));
    let shadow = format!("{}Y{}", "a".repeat(1000), "b".repeat(1000));

    let differences = diff(&response(200, &[], live), &response(200, &[], shadow));

    let context = differences[0].live.as_ref().unwrap()["context"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(context.chars().count(), 200);
    assert!(context.contains('X'));
}

#[test]
fn binary_bodies_report_size_and_hash_only() {
    let live = response(200, &[], vec![0xff, 0x00, 0x01]);
    let shadow = response(200, &[], vec![0xff, 0x00]);

    let differences = diff(&live, &shadow);

    let live_summary = differences[0].live.as_ref().unwrap();
    assert_eq!(live_summary["size"], json!(3));
    assert_eq!(differences[0].shadow.as_ref().unwrap()["size"], json!(2));
    assert!(live_summary.get("first_difference_line").is_none());
}

#[test]
fn empty_body_is_not_json() {
    // Empty against `{}` cannot be a structural match: the shadow added a body.
    let differences = diff_bodies("", "{}");

    assert_eq!(differences.len(), 1);
    assert_eq!(
        (differences[0].path.as_str(), differences[0].op),
        ("", DiffOp::Added)
    );
    assert_eq!(differences[0].live, None);
    assert_eq!(differences[0].shadow.as_ref().unwrap()["size"], json!(2));
}

#[test]
fn corrupt_gzip_is_reported_as_a_decode_failure() {
    let live = response(200, &[("Content-Encoding", "gzip")], gzip(USER.as_bytes()));
    let shadow = response(200, &[("Content-Encoding", "gzip")], USER);

    let differences = diff(&live, &shadow);

    assert_eq!(differences.len(), 1);
    assert_eq!(
        (differences[0].kind, differences[0].path.as_str()),
        (DiffKind::Body, "")
    );
    assert_eq!(
        differences[0].live.as_ref().unwrap()["size"],
        json!(USER.len())
    );
    let error = differences[0].shadow.as_ref().unwrap()["error"]
        .as_str()
        .unwrap();
    assert!(error.starts_with("gzip decode failed"), "{error}");
}

#[test]
fn truncated_streams_are_decode_failures() {
    let live = response(200, &[], USER);
    let cut = |data: Vec<u8>| Bytes::from(data[..data.len() / 2].to_vec());

    for (coding, encoded) in [
        ("gzip", gzip(USER.as_bytes())),
        ("deflate", zlib(USER.as_bytes())),
        ("deflate", raw_deflate(USER.as_bytes())),
        ("br", brotli_compress(USER.as_bytes())),
        ("zstd", zstd::encode_all(USER.as_bytes(), 3).unwrap()),
    ] {
        let shadow = response(200, &[("Content-Encoding", coding)], cut(encoded));
        let differences = diff(&live, &shadow);
        assert_eq!(differences.len(), 1, "{coding}");
        assert!(
            differences[0]
                .shadow
                .as_ref()
                .unwrap()
                .get("error")
                .is_some(),
            "{coding}"
        );
    }
}

#[test]
fn unsupported_coding_is_a_decode_failure_unless_bytes_are_identical() {
    let live = response(200, &[("Content-Encoding", "compress")], "abc");
    let shadow = response(200, &[("Content-Encoding", "compress")], "abd");

    let differences = diff(&live, &shadow);
    assert_eq!(
        differences[0].live.as_ref().unwrap()["error"],
        json!("unsupported content coding `compress`")
    );
    assert_eq!(diff(&live, &live.clone()), vec![]);
}

#[test]
fn decompression_bomb_is_reported_not_inflated() {
    let bomb = vec![0u8; MAX_DECODED_BODY_BYTES + 1];
    let live = response(200, &[("Content-Encoding", "gzip")], gzip(&bomb));
    let shadow = response(200, &[("Content-Encoding", "deflate")], zlib(&bomb));

    let differences = diff(&live, &shadow);

    assert_eq!(differences.len(), 1);
    for side in [&differences[0].live, &differences[0].shadow] {
        let error = side.as_ref().unwrap()["error"].as_str().unwrap();
        assert!(error.contains("exceeds"), "{error}");
    }
}

#[test]
fn body_differences_are_capped_at_100_and_the_total_kept() {
    let live: Vec<u32> = (0..250).collect();
    let shadow: Vec<u32> = (1..251).collect();

    let differences = diff_bodies(&json!(live).to_string(), &json!(shadow).to_string());

    assert_eq!(differences.len(), DEFAULT_MAX_DIFFERENCES + 1);
    assert_eq!(differences[99].path, "/99");
    let marker = differences.last().unwrap();
    assert_eq!((marker.kind, marker.path.as_str()), (DiffKind::Body, ""));
    assert_eq!(marker.live, Some(json!({"truncated_differences": 250})));
    assert_eq!(marker.shadow, Some(json!({"truncated_differences": 250})));
}

#[test]
fn deep_nesting_does_not_panic() {
    // Deeper than the parser accepts: compared as bytes, still reported.
    let live = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let shadow = format!("{}2{}", "[".repeat(100_000), "]".repeat(100_000));
    let differences = diff_bodies(&live, &shadow);
    assert_eq!(differences.len(), 1);
    assert_eq!(
        differences[0].live.as_ref().unwrap()["first_difference_column"],
        json!(100_001)
    );

    // Within the parser's limit: compared structurally down to the leaf.
    let live = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let shadow = format!("{}2{}", "[".repeat(100), "]".repeat(100));
    assert_eq!(diff_bodies(&live, &shadow)[0].path, "/0".repeat(100));
}

#[test]
fn values_past_the_depth_limit_are_reported_whole() {
    let nest = |leaf: Value| (0..300).fold(leaf, |inner, _| json!({ "k": inner }));
    let live = nest(json!(1));
    let shadow = nest(json!(2));

    let options = CompareOptions::default();
    let mut found = Found::new("", &options);
    Walker {
        route: "",
        options: &options,
        found: &mut found,
    }
    .diff(&live, &shadow, &mut String::new(), 0);
    let differences = found.finish().differences;

    assert_eq!(differences.len(), 1);
    assert_eq!(differences[0].path, "/k".repeat(MAX_JSON_DEPTH));
    assert_eq!(differences[0].op, DiffOp::Changed);
}

fn options_with(section: impl FnOnce(&mut crate::config::CompareSection)) -> CompareOptions {
    let mut config = crate::config::CompareSection::default();
    section(&mut config);
    let shadow = crate::config::Target::parse("s", "http://shadow.internal:8082", "t").unwrap();
    let live = crate::config::Target::parse("l", "http://live.internal:8081", "t").unwrap();
    CompareOptions::from_config(&config, Some(&live), &shadow, None)
}

fn on_route(route: &str) -> Context<'_> {
    Context {
        route,
        ..Context::default()
    }
}

#[test]
fn undecodable_body_is_not_comparable_never_a_match() {
    let live = response(200, &[("content-encoding", "gzip")], gzip(b"{}"));
    let shadow = response(
        200,
        &[("content-encoding", "gzip")],
        b"\x1f\x8b garbage".to_vec(),
    );

    let differences = diff(&live, &shadow);

    assert_eq!(differences.len(), 1);
    assert_eq!(differences[0].op, DiffOp::NotComparable);
    assert_eq!(differences[0].severity, Severity::Schema);
    assert!(differences[0].shadow.as_ref().unwrap()["error"].is_string());
}

#[test]
fn changed_status_class_ranks_above_a_changed_value() {
    let live = response(
        200,
        &[("content-type", "application/json")],
        r#"{"a":1,"b":2}"#,
    );
    let shadow = response(
        503,
        &[("content-type", "application/json")],
        r#"{"a":1,"b":3,"c":4}"#,
    );

    let differences = diff(&live, &shadow);
    let ranked: Vec<(&str, Severity)> = differences
        .iter()
        .map(|d| (d.path.as_str(), d.severity))
        .collect();

    assert_eq!(
        ranked,
        [
            ("", Severity::Status),
            ("/b", Severity::Value),
            ("/c", Severity::Addition)
        ]
    );
    // A status change within its class is a changed value, not a class change.
    let redirect = diff(&response(301, &[], ""), &response(302, &[], ""));
    assert_eq!(redirect[0].severity, Severity::Value);
}

#[test]
fn missing_field_and_type_change_rank_as_schema_breaks() {
    let differences = diff_bodies(r#"{"a":1,"b":"x","c":1}"#, r#"{"a":"1","c":2,"d":0}"#);
    let ranked: Vec<(&str, DiffOp, Severity)> = differences
        .iter()
        .map(|d| (d.path.as_str(), d.op, d.severity))
        .collect();

    assert_eq!(
        ranked,
        [
            ("/a", DiffOp::TypeChanged, Severity::Schema),
            ("/b", DiffOp::Removed, Severity::Schema),
            ("/c", DiffOp::Changed, Severity::Value),
            ("/d", DiffOp::Added, Severity::Addition),
        ]
    );
}

#[test]
fn location_naming_the_shadows_own_host_matches_the_live_host() {
    let options = options_with(|_| {});
    let context = Context {
        request_host: Some("shop.example.com"),
        ..Context::default()
    };
    let live = response(302, &[("Location", "http://shop.example.com/cart?x=1")], "");
    let shadow = response(
        302,
        &[("Location", "http://shadow.internal:8082/cart?x=1")],
        "",
    );

    assert!(compare_exchange(&context, &live, &shadow, &options).is_match());

    // Live naming its own target, shadow its own: equal too.
    let live_target = response(
        302,
        &[("Location", "http://live.internal:8081/cart?x=1")],
        "",
    );
    assert!(compare_exchange(&context, &live_target, &shadow, &options).is_match());

    // The path still counts, and so does a third host.
    let elsewhere = response(
        302,
        &[("Location", "http://shadow.internal:8082/login")],
        "",
    );
    let other_host = response(302, &[("Location", "http://evil.example.net/cart?x=1")], "");
    for shadow in [elsewhere, other_host] {
        let found = compare_exchange(&context, &live, &shadow, &options);
        assert_eq!(found.differences[0].path, "location");
        assert_eq!(
            found.differences[0].live,
            Some(json!(["http://shop.example.com/cart?x=1"])),
            "reported as sent, not as normalised"
        );
    }

    // Without the mapping the shadow's own host is a difference.
    assert_eq!(
        diff(
            &live,
            &response(
                302,
                &[("Location", "http://shadow.internal:8082/cart?x=1")],
                ""
            )
        )
        .len(),
        1
    );
}

#[test]
fn two_set_cookie_fields_are_two_values_not_one_folded_value() {
    let live = response(200, &[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], "ok");
    let folded = response(200, &[("Set-Cookie", "a=1, b=2")], "ok");

    let differences = diff(&live, &folded);

    assert_eq!(differences.len(), 1);
    assert_eq!(differences[0].live, Some(json!(["a=1", "b=2"])));
    assert_eq!(differences[0].shadow, Some(json!(["a=1, b=2"])));
    assert!(diff(&live, &live.clone()).is_empty());
}

#[test]
fn list_valued_headers_in_the_set_list_ignore_member_order() {
    let live = response(
        200,
        &[("Vary", "Accept, Accept-Encoding"), ("Allow", "GET, HEAD")],
        "",
    );
    let shadow = response(
        200,
        &[
            ("vary", "Accept-Encoding,Accept"),
            ("Allow", "HEAD"),
            ("allow", "GET"),
        ],
        "",
    );
    assert_eq!(diff(&live, &shadow), vec![]);

    let missing = response(200, &[("Vary", "Accept"), ("Allow", "GET, HEAD")], "");
    assert_eq!(diff(&live, &missing)[0].path, "vary");
}

#[test]
fn framing_headers_are_judged_after_decoding_even_when_not_volatile() {
    let options = CompareOptions {
        volatile_headers: vec![],
        ..CompareOptions::default()
    };
    let body = br#"{"a":1}"#;
    let live = response(
        200,
        &[("Content-Encoding", "gzip"), ("Content-Length", "27")],
        gzip(body),
    );
    let shadow = response(200, &[("Transfer-Encoding", "chunked")], body.to_vec());

    assert_eq!(compare(&live, &shadow, &options), vec![]);
}

#[test]
fn string_escapes_are_compared_after_unescaping() {
    assert_eq!(
        diff_bodies(r#"{"s":"caf\u00e9 \/ \"q\""}"#, r#"{"s":"café / \"q\""}"#),
        vec![]
    );
}

#[test]
fn unordered_paths_compare_arrays_as_multisets() {
    let options = options_with(|c| {
        c.unordered.push(crate::config::UnorderedRuleConfig {
            route: None,
            path: "/orders/*/tags".into(),
        })
    });
    let live = json_response(r#"{"orders":[{"tags":["a","b",{"k":1}]}],"list":[1,2]}"#);
    let shuffled = json_response(r#"{"orders":[{"tags":[{"k":1.0},"b","a"]}],"list":[1,2]}"#);
    assert!(compare_exchange(&Context::default(), &live, &shuffled, &options).is_match());

    // Elsewhere order still counts.
    let list_swapped = json_response(r#"{"orders":[{"tags":["a","b",{"k":1}]}],"list":[2,1]}"#);
    assert_eq!(
        compare_exchange(&Context::default(), &live, &list_swapped, &options).total,
        2
    );

    // A changed member is diffed field by field against the unmatched one.
    let changed = json_response(r#"{"orders":[{"tags":[{"k":2},"a","b"]}],"list":[1,2]}"#);
    let found = compare_exchange(&Context::default(), &live, &changed, &options);
    assert_eq!(found.differences.len(), 1);
    assert_eq!(found.differences[0].path, "/orders/0/tags/2/k");
}

#[test]
fn ignore_rules_drop_headers_and_paths_on_matching_routes() {
    let options = options_with(|c| {
        c.ignore.push(crate::config::IgnoreRuleConfig {
            route: None,
            header: Some("X-Build".into()),
            path: None,
        });
        c.ignore.push(crate::config::IgnoreRuleConfig {
            route: Some("GET /orders/*".into()),
            header: None,
            path: Some("/items/*/updated_at".into()),
        });
        c.ignore.push(crate::config::IgnoreRuleConfig {
            route: None,
            header: None,
            path: Some("/**/trace".into()),
        });
    });
    let live = response(
        200,
        &[("x-build", "1"), ("content-type", "application/json")],
        r#"{"items":[{"updated_at":1,"qty":1}],"deep":{"er":{"trace":"a"}}}"#,
    );
    let shadow = response(
        200,
        &[("x-build", "2"), ("content-type", "application/json")],
        r#"{"items":[{"updated_at":2,"qty":1}],"deep":{"er":{"trace":"b"}}}"#,
    );

    let on_orders = compare_exchange(&on_route("GET /orders/{id}"), &live, &shadow, &options);
    assert!(on_orders.is_match(), "{on_orders:?}");

    let elsewhere = compare_exchange(&on_route("GET /carts/{id}"), &live, &shadow, &options);
    let paths: Vec<&str> = elsewhere
        .differences
        .iter()
        .map(|d| d.path.as_str())
        .collect();
    assert_eq!(paths, ["/items/0/updated_at"]);
}

#[test]
fn form_bodies_are_compared_parameter_by_parameter() {
    let form = [(
        "content-type",
        "application/x-www-form-urlencoded; charset=utf-8",
    )];
    let live = response(200, &form, "a=1&b=x%20y&tag=1&tag=2");
    let reordered = response(200, &form, "b=x+y&tag=1&tag=2&a=1");
    assert_eq!(diff(&live, &reordered), vec![]);

    let changed = response(200, &form, "a=1&b=x%20z&tag=1&tag=2&c=new");
    let found: Vec<(String, DiffOp)> = diff(&live, &changed)
        .into_iter()
        .map(|d| (d.path, d.op))
        .collect();
    assert_eq!(
        found,
        [
            ("/b".to_owned(), DiffOp::Changed),
            ("/c".to_owned(), DiffOp::Added)
        ]
    );
}

#[test]
fn json_against_html_is_a_type_change_of_the_whole_body() {
    let live = json_response(r#"{"ok":true}"#);
    let shadow = response(
        502,
        &[("content-type", "text/html")],
        "<html>Bad Gateway</html>",
    );

    let differences = diff(&live, &shadow);
    let body = differences
        .iter()
        .find(|d| d.kind == DiffKind::Body)
        .unwrap();

    assert_eq!((body.path.as_str(), body.op), ("", DiffOp::TypeChanged));
    assert_eq!(body.live.as_ref().unwrap()["format"], "json");
    assert_eq!(body.shadow.as_ref().unwrap()["format"], "text");
    assert_eq!(
        differences[0].kind,
        DiffKind::Status,
        "the status ranks first"
    );
}

#[test]
fn a_body_that_disappears_is_removed() {
    let differences = diff(&json_response(r#"{"a":1}"#), &response(200, &[], ""));
    let body = differences
        .iter()
        .find(|d| d.kind == DiffKind::Body)
        .unwrap();
    assert_eq!(
        (body.op, body.severity),
        (DiffOp::Removed, Severity::Schema)
    );
}

#[test]
fn the_cap_keeps_the_most_severe_differences_and_counts_all() {
    let options = CompareOptions {
        max_differences: 3,
        ..CompareOptions::default()
    };
    let live: Value = json!({"v": (0..10).collect::<Vec<u32>>(), "gone": 1});
    let shadow: Value = json!({"v": (1..11).collect::<Vec<u32>>()});

    let found = compare_exchange(
        &Context::default(),
        &json_response(&live.to_string()),
        &json_response(&shadow.to_string()),
        &options,
    );

    assert_eq!(found.total, 11);
    assert_eq!(found.differences.len(), 3);
    assert_eq!(found.differences[0].path, "/gone");
    let stored = found.into_stored();
    assert_eq!(
        stored.last().unwrap().live,
        Some(json!({"truncated_differences": 11}))
    );
}
