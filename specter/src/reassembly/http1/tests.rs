use super::*;

fn headers(fields: &[(&str, &str)]) -> Headers {
    Headers(
        fields
            .iter()
            .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
    )
}

#[test]
fn chunk_sizes_are_hex_with_optional_extensions() {
    assert_eq!(parse_chunk_size(b"1a\r\n"), Some(26));
    assert_eq!(parse_chunk_size(b"FF;name=value;x\r\n"), Some(255));
    assert_eq!(parse_chunk_size(b"0\n"), Some(0));
    assert_eq!(parse_chunk_size(b"5 ; ext\r\n"), Some(5));
    assert_eq!(parse_chunk_size(b"\r\n"), None);
    assert_eq!(parse_chunk_size(b"xyz\r\n"), None);
    assert_eq!(parse_chunk_size(b"-1\r\n"), None);
    assert_eq!(parse_chunk_size(b"10000000000000000\r\n"), None);
}

#[test]
fn request_lines_need_method_target_and_http1_version() {
    assert!(is_request_line(b"GET /a?b=c HTTP/1.1\r", true));
    assert!(is_request_line(b"OPTIONS * HTTP/1.0", true));
    assert!(is_request_line(b"CONNECT example.com:443 HTTP/1.1", true));
    assert!(!is_request_line(b"GET /a HTTP/2.0", true));
    assert!(!is_request_line(b"GET  /a HTTP/1.1", true));
    assert!(!is_request_line(b"GET /a HTTP/1.1 extra", true));
    // Scanning after a gap accepts known methods only; a boundary accepts any token.
    assert!(!is_request_line(b"ET /a HTTP/1.1", true));
    assert!(is_request_line(b"PURGE /a HTTP/1.1", false));
}

#[test]
fn status_lines_need_version_and_three_digits() {
    assert!(is_status_line(b"HTTP/1.1 200 OK\r"));
    assert!(is_status_line(b"HTTP/1.0 404"));
    assert!(is_status_line(b"HTTP/1.1 500 Internal Server Error"));
    assert!(!is_status_line(b"TTP/1.1 200 OK"));
    assert!(!is_status_line(b"HTTP/1.1 20 OK"));
    assert!(!is_status_line(b"HTTP/1.1 2000"));
    assert!(!is_status_line(b"HTTP/2 200"));
}

#[test]
fn the_first_line_tells_http1_from_other_protocols() {
    assert_eq!(judge_first_line(b"GE"), Judgement::Undecided);
    assert_eq!(
        judge_first_line(b"GET /index.html HT"),
        Judgement::Undecided
    );
    assert_eq!(
        judge_first_line(b"GET /index.html HTTP/1.1\r\n"),
        Judgement::Http1
    );
    assert_eq!(judge_first_line(b"PRI * HT"), Judgement::Undecided);
    assert_eq!(
        judge_first_line(b"PRI * HTTP/2.0\r\n\r\nSM"),
        Judgement::Http2
    );
    assert_eq!(
        judge_first_line(b"\x16\x03\x01\x02\x00"),
        Judgement::NotHttp
    );
    assert_eq!(
        judge_first_line(b"*1\r\n$4\r\nPING\r\n"),
        Judgement::NotHttp
    );
    assert_eq!(judge_first_line(b"GET /a HTTP/3"), Judgement::NotHttp);
    assert_eq!(
        judge_first_line(b"SSH-2.0-OpenSSH_9.6\r\n"),
        Judgement::NotHttp
    );
}

#[test]
fn chunked_wins_over_content_length() {
    let both = headers(&[
        ("content-length", "5"),
        ("transfer-encoding", "gzip, chunked"),
    ]);
    assert_eq!(
        declared_framing(&both, Side::Request).ok(),
        Some(Declared::Chunked)
    );
    let gzip_only = headers(&[("transfer-encoding", "gzip")]);
    assert_eq!(
        declared_framing(&gzip_only, Side::Response).ok(),
        Some(Declared::Unframed)
    );
    assert!(declared_framing(&gzip_only, Side::Request).is_err());
}

#[test]
fn content_length_must_be_one_number() {
    let same = headers(&[("content-length", "7, 7"), ("content-length", "7")]);
    assert_eq!(
        declared_framing(&same, Side::Request).ok(),
        Some(Declared::Length(7))
    );
    let differ = headers(&[("content-length", "7"), ("content-length", "8")]);
    assert!(declared_framing(&differ, Side::Request).is_err());
    let signed = headers(&[("content-length", "+7")]);
    assert!(declared_framing(&signed, Side::Request).is_err());
    assert_eq!(
        declared_framing(&Headers::default(), Side::Response).ok(),
        Some(Declared::Unframed)
    );
}

#[test]
fn response_framing_follows_method_and_status() {
    assert_eq!(response_framing(Some("HEAD"), 200), ResponseFraming::NoBody);
    assert_eq!(response_framing(Some("GET"), 204), ResponseFraming::NoBody);
    assert_eq!(response_framing(Some("GET"), 304), ResponseFraming::NoBody);
    assert_eq!(response_framing(Some("GET"), 101), ResponseFraming::Tunnel);
    assert_eq!(
        response_framing(Some("CONNECT"), 200),
        ResponseFraming::Tunnel
    );
    assert_eq!(
        response_framing(Some("CONNECT"), 407),
        ResponseFraming::FromHeaders
    );
    assert_eq!(response_framing(None, 200), ResponseFraming::FromHeaders);
}

#[test]
fn heads_keep_field_order_with_lower_case_names() {
    let (head, declared) = parse_request(
        b"POST /x HTTP/1.0\r\nHost: a\r\nX-Two: 1\r\nx-two: 2\r\nContent-Length: 3\r\n\r\n",
    )
    .unwrap();
    assert_eq!(head.method, "POST");
    assert_eq!(head.version, 0);
    let names: Vec<&str> = head.headers.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["host", "x-two", "x-two", "content-length"]);
    assert_eq!(declared, Declared::Length(3));

    let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
    let error = parse_request(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).unwrap_err();
    assert!(matches!(error, FramingError::TooManyHeaders));
}
