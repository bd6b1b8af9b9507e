//! Compare: decides whether the shadow answered like the live service, and where it did not.
//!
//! It sits between replay and record in the pipeline: replay hands it two responses (live and
//! shadow, or two answers used to learn noise), it returns every [`Difference`] between them,
//! each with its [`Severity`], and the profile decides which of them are noise.
//!
//! Both responses are normalised before they are compared, so that only what a client could
//! notice is reported:
//!
//! - **Status**: one `status` difference when the codes differ; a change of class (2xx to
//!   5xx) is the most severe difference there is.
//! - **Headers**: names case-insensitively, each name's values as an ordered list (two
//!   `Set-Cookie` fields are two values, never folded into one), or as a set for list-valued
//!   headers named in `compare.set_headers`. Volatile headers ([`DEFAULT_VOLATILE_HEADERS`])
//!   and the user's `compare.ignore` headers are skipped. `Content-Length`, `Content-Encoding`
//!   and `Transfer-Encoding` are judged through the decoded body, never as headers. A
//!   `Location` naming a side's own host is compared as if it named the live host.
//! - **Body**: content coding is undone first; a body that cannot be decoded is reported as
//!   `not_comparable`, never taken for a match. JSON is compared structurally (key order
//!   ignored, numbers by value, arrays by position or as multisets at `compare.unordered`
//!   paths) with each differing leaf reported under its JSON Pointer; form-urlencoded bodies are
//!   compared parameter by parameter; text by its first differing line; anything else by size
//!   and hash.
//!
//! Noise learning ([`noise`]) reuses the same comparison on pairs of answers that should have
//! been equal. The inputs come from services we do not control, so nothing here may panic or
//! grow without bound: decoded bodies are capped, JSON recursion is capped, and so is the
//! number of differences kept per exchange.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    fmt::Write as _,
    io::{self, Read},
};

use flate2::{Decompress, FlushDecompress, Status, read::MultiGzDecoder};
use serde_json::{Map, Number, Value, json};
use thiserror::Error;
use tracing::debug;

use crate::{
    config::{CompareSection, Target},
    event::{DiffKind, DiffOp, Difference, Severity},
    exchange::{Headers, Response},
};

pub mod noise;
mod rules;

pub use rules::{IgnoreRule, Ignored, PathPattern, UnorderedRule};

/// Headers that differ between any two responses, even two answers of the same service to the
/// same request, and so are never compared. `compare.volatile_headers` replaces the list.
pub const DEFAULT_VOLATILE_HEADERS: &[&str] = &[
    // Clocks: the time the response was made, or a time derived from it.
    "date",
    "age",
    // `Expires` is almost always computed as "now plus max-age", so it moves with the clock;
    // the caching policy itself is in `Cache-Control`, which is still compared.
    "expires",
    // Per-request identifiers and tracing context.
    "x-request-id",
    "x-correlation-id",
    "request-id",
    "traceparent",
    "tracestate",
    "x-trace-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "b3",
    "x-amzn-trace-id",
    "x-amzn-requestid",
    "x-amz-cf-id",
    "x-cloud-trace-context",
    "cf-ray",
    // How long the request took on the server.
    "server-timing",
    "x-runtime",
    "x-response-time",
    "x-envoy-upstream-service-time",
    // `ETag` fingerprints the representation, and servers often build it from things that
    // differ between deployments of the same content (file mtime and inode, the compression
    // applied). With equal bodies a differing ETag is noise; with different bodies the body
    // difference already says so. A user who wants to check caching validators can take it
    // out of the list.
    "etag",
    // Set by the framing of each connection, not by the application.
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

/// List-valued headers compared as sets by default: their comma-separated members mean the
/// same in any order. `compare.set_headers` replaces the list.
pub const DEFAULT_SET_HEADERS: &[&str] = &[
    "allow",
    "vary",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-expose-headers",
    "content-language",
    "accept-patch",
];

/// Headers judged through the decoded body and never compared as headers: gzip against
/// identity, or chunked against `Content-Length`, is not a divergence by itself.
const FRAMING_HEADERS: [&str; 3] = ["content-length", "content-encoding", "transfer-encoding"];

/// Headers that hold a URL which may name the answering side's own host.
const URL_HEADERS: [&str; 2] = ["location", "content-location"];

/// Decoded bodies larger than this are not compared: the limit keeps a decompression bomb (a
/// few kilobytes of gzip that inflate to gigabytes) from exhausting memory.
pub const MAX_DECODED_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Differences kept per exchange unless `compare.max_differences` says otherwise. Past it, one
/// more difference with path "" carries `{"truncated_differences": N}` on both sides, N being
/// the total found (kept ones included).
pub const DEFAULT_MAX_DIFFERENCES: usize = 100;

/// Containers nested deeper than this are compared whole and reported as one changed value at
/// their path, so recursion stays bounded. (The JSON parser already refuses input nested deeper
/// than 128, so this is a second guard.)
const MAX_JSON_DEPTH: usize = 128;

/// Longest context string shown for a differing line of a text body, in characters.
const CONTEXT_CHARS: usize = 200;

/// How many characters before the first differing one a context string starts.
const CONTEXT_LEAD: usize = 40;

/// What the comparison ignores and how it normalises.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Header names never compared, lower-case.
    pub volatile_headers: Vec<String>,
    /// Header names whose comma-separated values are compared as a set, lower-case.
    pub set_headers: Vec<String>,
    /// `compare.ignore`.
    pub ignore: Vec<IgnoreRule>,
    /// `compare.unordered`.
    pub unordered: Vec<UnorderedRule>,
    /// Differences kept per exchange.
    pub max_differences: usize,
    /// Authorities (`host:port`, lower-case) that name each side's own host in a `Location`.
    pub live_hosts: Vec<String>,
    pub shadow_hosts: Vec<String>,
    pub secondary_hosts: Vec<String>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            volatile_headers: lower_case(DEFAULT_VOLATILE_HEADERS),
            set_headers: lower_case(DEFAULT_SET_HEADERS),
            ignore: Vec::new(),
            unordered: Vec::new(),
            max_differences: DEFAULT_MAX_DIFFERENCES,
            live_hosts: Vec::new(),
            shadow_hosts: Vec::new(),
            secondary_hosts: Vec::new(),
        }
    }
}

fn lower_case<S: AsRef<str>>(names: &[S]) -> Vec<String> {
    names
        .iter()
        .map(|n| n.as_ref().to_ascii_lowercase())
        .collect()
}

impl CompareOptions {
    /// The options a validated config asks for.
    pub fn from_config(
        section: &CompareSection,
        live: Option<&Target>,
        shadow: &Target,
        secondary: Option<&Target>,
    ) -> Self {
        let hosts = |target: Option<&Target>| {
            target
                .map(|t| vec![normalise_authority(&t.authority)])
                .unwrap_or_default()
        };
        Self {
            volatile_headers: lower_case(&section.volatile_headers),
            set_headers: lower_case(&section.set_headers),
            ignore: section
                .ignore
                .iter()
                .filter_map(IgnoreRule::from_config)
                .collect(),
            unordered: section
                .unordered
                .iter()
                .filter_map(UnorderedRule::from_config)
                .collect(),
            max_differences: section.max_differences.max(1),
            live_hosts: hosts(live),
            shadow_hosts: hosts(Some(shadow)),
            secondary_hosts: hosts(secondary),
        }
    }

    /// True when differences in `header` (any case) are never reported on any route.
    pub fn ignores(&self, header: &str) -> bool {
        self.volatile_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(header))
    }

    fn ignores_header_on(&self, route: &str, header: &str) -> bool {
        self.ignores(header)
            || FRAMING_HEADERS.contains(&header)
            || self.ignore.iter().any(|rule| {
                matches!(&rule.ignored, Ignored::Header(h) if h == header) && rule.applies_to(route)
            })
    }

    fn hosts(&self, side: Side) -> &[String] {
        match side {
            Side::Live => &self.live_hosts,
            Side::Shadow => &self.shadow_hosts,
            Side::Secondary => &self.secondary_hosts,
        }
    }
}

/// Which service answered one of the two responses compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Live,
    Shadow,
    Secondary,
}

/// What the comparison needs to know about the exchange beyond the two responses.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The route, for rules that apply to some routes only.
    pub route: &'a str,
    /// The `Host` the client sent: each side may name it as its own host.
    pub request_host: Option<&'a str>,
    /// Who answered the first and the second response.
    pub sides: (Side, Side),
}

impl Default for Context<'_> {
    fn default() -> Self {
        Self {
            route: "",
            request_host: None,
            sides: (Side::Live, Side::Shadow),
        }
    }
}

/// Why a body could not be decoded.
#[derive(Debug, Error)]
enum DecodeError {
    #[error("unsupported content coding `{0}`")]
    Unsupported(String),
    #[error("{coding} decode failed: {reason}")]
    Corrupt { coding: String, reason: String },
    #[error(
        "{coding} decode failed: decoded body exceeds {limit} bytes",
        limit = MAX_DECODED_BODY_BYTES
    )]
    TooLarge { coding: String },
}

/// The differences between two responses, most severe first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Comparison {
    /// At most `max_differences` of them, keeping the most severe.
    pub differences: Vec<Difference>,
    /// How many were found, kept or not.
    pub total: usize,
}

impl Comparison {
    /// True when nothing differs.
    pub fn is_match(&self) -> bool {
        self.total == 0
    }

    /// The differences to store: those kept, and when some were left out one more with path
    /// "" saying how many there were in all.
    pub fn into_stored(mut self) -> Vec<Difference> {
        if self.total > self.differences.len() {
            debug!(
                total = self.total,
                kept = self.differences.len(),
                "Differences truncated"
            );
            let marker = json!({ "truncated_differences": self.total });
            self.differences.push(Difference {
                kind: DiffKind::Body,
                path: String::new(),
                op: DiffOp::Changed,
                live: Some(marker.clone()),
                shadow: Some(marker),
                severity: Severity::Value,
                noise: false,
            });
        }
        self.differences
    }
}

/// Every difference between the live and the shadow response, as stored; empty when they
/// match. The same as [`compare_exchange`] with no route and no request host.
pub fn compare(live: &Response, shadow: &Response, options: &CompareOptions) -> Vec<Difference> {
    compare_exchange(&Context::default(), live, shadow, options).into_stored()
}

/// Every difference between two responses to one request, the first answered by
/// `context.sides.0` and the second by `context.sides.1`.
pub fn compare_exchange(
    context: &Context<'_>,
    first: &Response,
    second: &Response,
    options: &CompareOptions,
) -> Comparison {
    let mut found = Found::new(context.route, options);

    if first.status != second.status {
        found.record(
            DiffKind::Status,
            "",
            DiffOp::Changed,
            Some(&json!(first.status)),
            Some(&json!(second.status)),
        );
    }
    compare_headers(
        context,
        &first.headers,
        &second.headers,
        options,
        &mut found,
    );
    compare_bodies(context, first, second, options, &mut found);

    found.finish()
}

/// How much a difference matters; see [`Severity`].
pub fn severity(
    kind: DiffKind,
    op: DiffOp,
    live: Option<&Value>,
    shadow: Option<&Value>,
) -> Severity {
    match (kind, op) {
        (DiffKind::Status, _) => {
            let class = |v: Option<&Value>| v.and_then(Value::as_u64).map(|s| s / 100);
            if class(live) == class(shadow) {
                Severity::Value
            } else {
                Severity::Status
            }
        }
        (_, DiffOp::Removed | DiffOp::TypeChanged | DiffOp::NotComparable) => Severity::Schema,
        (_, DiffOp::Changed) => Severity::Value,
        (_, DiffOp::Added) => Severity::Addition,
    }
}

/// Differences found so far: the most severe `max` kept, all counted.
struct Found<'o> {
    kept: Vec<Difference>,
    total: usize,
    max: usize,
    /// Body paths `compare.ignore` leaves out on this route.
    ignored_paths: Vec<&'o PathPattern>,
}

impl<'o> Found<'o> {
    fn new(route: &str, options: &'o CompareOptions) -> Self {
        Self {
            kept: Vec::new(),
            total: 0,
            max: options.max_differences.max(1),
            ignored_paths: options
                .ignore
                .iter()
                .filter(|rule| rule.applies_to(route))
                .filter_map(|rule| match &rule.ignored {
                    Ignored::Path(pattern) => Some(pattern),
                    Ignored::Header(_) => None,
                })
                .collect(),
        }
    }

    fn record(
        &mut self,
        kind: DiffKind,
        path: &str,
        op: DiffOp,
        live: Option<&Value>,
        shadow: Option<&Value>,
    ) {
        if kind == DiffKind::Body && self.ignored_paths.iter().any(|p| p.matches(path)) {
            return;
        }
        self.total += 1;
        let severity = severity(kind, op, live, shadow);

        // Full: a more severe difference takes the place of the least severe one kept, so a
        // schema break deep in a large body is not lost behind a hundred changed values.
        if self.kept.len() >= self.max {
            let weakest = self
                .kept
                .iter()
                .enumerate()
                .rev()
                .min_by_key(|(_, d)| d.severity)
                .map(|(i, d)| (i, d.severity));
            match weakest {
                Some((index, weakest)) if weakest < severity => {
                    self.kept.remove(index);
                }
                _ => return,
            }
        }
        self.kept.push(Difference {
            kind,
            path: path.to_owned(),
            op,
            live: live.cloned(),
            shadow: shadow.cloned(),
            severity,
            noise: false,
        });
    }

    fn finish(mut self) -> Comparison {
        // Stable: differences of one severity keep the order they were found in.
        self.kept.sort_by_key(|d| std::cmp::Reverse(d.severity));
        Comparison {
            differences: self.kept,
            total: self.total,
        }
    }
}

fn compare_headers(
    context: &Context<'_>,
    first: &Headers,
    second: &Headers,
    options: &CompareOptions,
    found: &mut Found<'_>,
) {
    // Names in the order they first appear, first side first, so reports read like the
    // responses.
    let mut seen = HashSet::new();
    let mut names = Vec::new();
    for (name, _) in first.iter().chain(second.iter()) {
        let name = name.to_ascii_lowercase();
        if options.ignores_header_on(context.route, &name) || !seen.insert(name.clone()) {
            continue;
        }
        names.push(name);
    }

    for name in names {
        let first_values = field_values(first, &name);
        let second_values = field_values(second, &name);
        let op = match (first_values.is_empty(), second_values.is_empty()) {
            (false, true) => DiffOp::Removed,
            (true, false) => DiffOp::Added,
            _ if header_values_equal(context, options, &name, &first_values, &second_values) => {
                continue;
            }
            _ => DiffOp::Changed,
        };
        let first_json = (!first_values.is_empty()).then(|| values_json(&first_values));
        let second_json = (!second_values.is_empty()).then(|| values_json(&second_values));
        found.record(
            DiffKind::Header,
            &name,
            op,
            first_json.as_ref(),
            second_json.as_ref(),
        );
    }
}

/// Equal once normalised: as sets for `compare.set_headers`, with own-host URLs mapped for
/// `Location`, as ordered lists otherwise.
fn header_values_equal(
    context: &Context<'_>,
    options: &CompareOptions,
    name: &str,
    first: &[&[u8]],
    second: &[&[u8]],
) -> bool {
    if first == second {
        return true;
    }
    if options.set_headers.iter().any(|h| h == name) {
        return set_members(first) == set_members(second);
    }
    if URL_HEADERS.contains(&name) {
        let first: Vec<Cow<'_, [u8]>> = first
            .iter()
            .map(|v| own_host_mapped(v, context.sides.0, context, options))
            .collect();
        let second: Vec<Cow<'_, [u8]>> = second
            .iter()
            .map(|v| own_host_mapped(v, context.sides.1, context, options))
            .collect();
        return first == second;
    }
    false
}

/// The comma-separated members of a list-valued header, sorted, duplicates kept.
fn set_members(values: &[&[u8]]) -> Vec<String> {
    let mut members: Vec<String> = values
        .iter()
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|m| m.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|m| !m.is_empty())
        .collect();
    members.sort_unstable();
    members
}

/// The placeholder an own-host authority is replaced with before URLs are compared.
const OWN_HOST: &str = "\u{0}own-host\u{0}";

/// `value` with its authority replaced by [`OWN_HOST`] when it is an absolute URL naming the
/// host of the side that sent it (its target, or the Host the client asked for), so that a
/// shadow redirecting to itself matches a live service redirecting to itself.
fn own_host_mapped<'v>(
    value: &'v [u8],
    side: Side,
    context: &Context<'_>,
    options: &CompareOptions,
) -> Cow<'v, [u8]> {
    let Ok(text) = std::str::from_utf8(value) else {
        return Cow::Borrowed(value);
    };
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() && !scheme.contains(['/', '?', '#']) => {
            (scheme, rest)
        }
        _ => match text.strip_prefix("//") {
            Some(rest) => ("", rest),
            None => return Cow::Borrowed(value),
        },
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = normalise_authority(&rest[..end]);
    let own = options.hosts(side).contains(&authority)
        || context
            .request_host
            .is_some_and(|host| normalise_authority(host) == authority);
    if !own {
        return Cow::Borrowed(value);
    }
    Cow::Owned(
        format!(
            "{}//{OWN_HOST}{}",
            scheme.to_ascii_lowercase(),
            &rest[end..]
        )
        .into_bytes(),
    )
}

/// An authority lower-cased, without user info and without the default HTTP(S) port.
fn normalise_authority(authority: &str) -> String {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let lower = authority.to_ascii_lowercase();
    for default_port in [":80", ":443"] {
        if let Some(host) = lower.strip_suffix(default_port) {
            return host.to_owned();
        }
    }
    lower
}

/// The values of one header name in order, without the optional whitespace around each value
/// (RFC 9110, section 5.5), which is not part of the value.
fn field_values<'a>(headers: &'a Headers, name: &'a str) -> Vec<&'a [u8]> {
    headers
        .get_all(name)
        .map(|value| value.trim_ascii())
        .collect()
}

/// Header values are always reported as an array of strings, even when there is one.
fn values_json(values: &[&[u8]]) -> Value {
    Value::Array(
        values
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v).into_owned()))
            .collect(),
    )
}

fn compare_bodies<'o>(
    context: &Context<'_>,
    first: &Response,
    second: &Response,
    options: &'o CompareOptions,
    found: &mut Found<'o>,
) {
    let first_codings = content_codings(&first.headers);
    let second_codings = content_codings(&second.headers);

    // The same bytes under the same codings decode to the same body, so skip the work.
    if first.body == second.body && first_codings == second_codings {
        return;
    }

    let first_decoded = decode(&first.body, &first_codings);
    let second_decoded = decode(&second.body, &second_codings);
    let (first_body, second_body) = match (first_decoded, second_decoded) {
        (Ok(first_body), Ok(second_body)) => (first_body, second_body),

        // A body we cannot read is never taken for a match.
        (first_decoded, second_decoded) => {
            for (side, decoded) in [
                (context.sides.0, &first_decoded),
                (context.sides.1, &second_decoded),
            ] {
                if let Err(error) = decoded {
                    debug!(%error, ?side, "Body could not be decoded");
                }
            }
            found.record(
                DiffKind::Body,
                "",
                DiffOp::NotComparable,
                Some(&decoded_summary(&first_decoded)),
                Some(&decoded_summary(&second_decoded)),
            );
            return;
        }
    };

    if first_body == second_body {
        return;
    }

    // A body that appears or disappears is one difference, whatever it holds.
    match (first_body.is_empty(), second_body.is_empty()) {
        (true, false) => {
            let summary = body_summary(&second_body);
            found.record(DiffKind::Body, "", DiffOp::Added, None, Some(&summary));
            return;
        }
        (false, true) => {
            let summary = body_summary(&first_body);
            found.record(DiffKind::Body, "", DiffOp::Removed, Some(&summary), None);
            return;
        }
        _ => {}
    }

    let mut walker = Walker {
        route: context.route,
        options,
        found,
    };
    if is_form(&first.headers) && is_form(&second.headers) {
        let (first_form, second_form) = (form_json(&first_body), form_json(&second_body));
        walker.diff(&first_form, &second_form, &mut String::new(), 0);
        return;
    }
    match (parse_json(&first_body), parse_json(&second_body)) {
        (Some(first_json), Some(second_json)) => {
            walker.diff(&first_json, &second_json, &mut String::new(), 0);
        }
        // JSON on one side only: the shadow answered in another format (an HTML error page
        // where an API answer was expected), which no field-level comparison can describe.
        (Some(_), None) | (None, Some(_)) => {
            let mut first_summary = body_summary(&first_body);
            let mut second_summary = body_summary(&second_body);
            for (summary, body) in [
                (&mut first_summary, &first_body),
                (&mut second_summary, &second_body),
            ] {
                if let Value::Object(fields) = summary {
                    fields.insert("format".to_owned(), json!(body_format(body)));
                }
            }
            found.record(
                DiffKind::Body,
                "",
                DiffOp::TypeChanged,
                Some(&first_summary),
                Some(&second_summary),
            );
        }
        (None, None) => {
            let (first_summary, second_summary) = bytes_summaries(&first_body, &second_body);
            found.record(
                DiffKind::Body,
                "",
                DiffOp::Changed,
                Some(&first_summary),
                Some(&second_summary),
            );
        }
    }
}

/// What a body is, for a difference that says its format changed.
fn body_format(body: &[u8]) -> &'static str {
    if parse_json(body).is_some() {
        "json"
    } else if std::str::from_utf8(body).is_ok() {
        "text"
    } else {
        "binary"
    }
}

/// True when the media type is `application/x-www-form-urlencoded`.
fn is_form(headers: &Headers) -> bool {
    headers.get_str("content-type").is_some_and(|value| {
        value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

/// A form body as a JSON object: each parameter's value as a string, or as an array of
/// strings in order when the parameter repeats. Names keep their first position.
fn form_json(body: &[u8]) -> Value {
    let mut fields: Map<String, Value> = Map::new();
    for (name, value) in form_urlencoded::parse(body) {
        let value = Value::String(value.into_owned());
        match fields.get_mut(name.as_ref()) {
            None => {
                fields.insert(name.into_owned(), value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(single) => {
                let first = single.take();
                *single = Value::Array(vec![first, value]);
            }
        }
    }
    Value::Object(fields)
}

/// The content codings of a response, in the order they were applied, `identity` left out.
fn content_codings(headers: &Headers) -> Vec<String> {
    let mut codings = Vec::new();
    for value in headers.get_all("content-encoding") {
        for coding in String::from_utf8_lossy(value).split(',') {
            let coding = coding.trim().to_ascii_lowercase();
            if !coding.is_empty() && coding != "identity" {
                codings.push(coding);
            }
        }
    }
    codings
}

/// The body with its content codings undone, last applied first.
fn decode<'a>(body: &'a [u8], codings: &[String]) -> Result<Cow<'a, [u8]>, DecodeError> {
    // A response to HEAD, or a 304, names its coding but carries no body to decode.
    if body.is_empty() {
        return Ok(Cow::Borrowed(body));
    }

    let mut decoded = Cow::Borrowed(body);
    for coding in codings.iter().rev() {
        decoded = Cow::Owned(decode_one(&decoded, coding)?);
    }
    Ok(decoded)
}

fn decode_one(input: &[u8], coding: &str) -> Result<Vec<u8>, DecodeError> {
    match coding {
        // Several gzip members in a row are one valid body (RFC 1952, section 2.2).
        "gzip" | "x-gzip" => read_capped(MultiGzDecoder::new(input), coding),

        // `deflate` means zlib-wrapped (RFC 9110, section 8.4.1.2), but some servers send raw
        // deflate; browsers accept both, so we do too.
        "deflate" if looks_like_zlib(input) => inflate(input, true, coding)
            .or_else(|error| inflate(input, false, coding).map_err(|_| error)),
        "deflate" => inflate(input, false, coding),

        "br" => read_capped(brotli::Decompressor::new(input, 4096), coding),
        "zstd" => {
            let decoder = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|error| corrupt(coding, &error))?;
            read_capped(decoder, coding)
        }
        other => Err(DecodeError::Unsupported(other.to_owned())),
    }
}

/// Reads a decoder to its end, failing once the output passes the cap.
fn read_capped(reader: impl Read, coding: &str) -> Result<Vec<u8>, DecodeError> {
    let mut output = Vec::new();
    let cap = u64::try_from(MAX_DECODED_BODY_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut output)
        .map_err(|error| corrupt(coding, &error))?;
    if output.len() > MAX_DECODED_BODY_BYTES {
        return Err(DecodeError::TooLarge {
            coding: coding.to_owned(),
        });
    }
    Ok(output)
}

fn corrupt(coding: &str, error: &io::Error) -> DecodeError {
    DecodeError::Corrupt {
        coding: coding.to_owned(),
        reason: error.to_string(),
    }
}

/// True when the first two bytes are a valid zlib header (RFC 1950, section 2.2): deflate
/// method, a window of at most 32 KiB, no preset dictionary, and the header checksum.
fn looks_like_zlib(input: &[u8]) -> bool {
    match input {
        [cmf, flg, ..] => {
            let check = (u16::from(*cmf) << 8) | u16::from(*flg);
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && flg & 0x20 == 0 && check % 31 == 0
        }
        _ => false,
    }
}

/// Inflates a zlib or raw deflate stream. Driven by hand rather than through a `Read` adapter
/// because the adapter ends quietly on a stream cut short; here that is an error.
fn inflate(input: &[u8], zlib_header: bool, coding: &str) -> Result<Vec<u8>, DecodeError> {
    let mut inflater = Decompress::new(zlib_header);
    let mut output = Vec::with_capacity(
        input
            .len()
            .saturating_mul(4)
            .clamp(1024, MAX_DECODED_BODY_BYTES),
    );

    loop {
        if output.len() == output.capacity() {
            if output.len() > MAX_DECODED_BODY_BYTES {
                return Err(DecodeError::TooLarge {
                    coding: coding.to_owned(),
                });
            }
            let room = output
                .capacity()
                .min(MAX_DECODED_BODY_BYTES + 1 - output.len());
            output.reserve_exact(room.max(1));
        }

        let consumed_before = inflater.total_in();
        let produced_before = output.len();
        let consumed = usize::try_from(consumed_before).unwrap_or(usize::MAX);
        let rest = input.get(consumed..).unwrap_or_default();
        let status = inflater
            .decompress_vec(rest, &mut output, FlushDecompress::None)
            .map_err(|error| DecodeError::Corrupt {
                coding: coding.to_owned(),
                reason: error.to_string(),
            })?;

        if status == Status::StreamEnd {
            break;
        }
        // Room left for output, yet nothing moved: the input ran out before the final block.
        if inflater.total_in() == consumed_before && output.len() == produced_before {
            return Err(DecodeError::Corrupt {
                coding: coding.to_owned(),
                reason: "stream ends before its final block".to_owned(),
            });
        }
    }

    if output.len() > MAX_DECODED_BODY_BYTES {
        return Err(DecodeError::TooLarge {
            coding: coding.to_owned(),
        });
    }
    Ok(output)
}

/// The body as JSON, when it is JSON. An empty body is not.
fn parse_json(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

fn decoded_summary(decoded: &Result<Cow<'_, [u8]>, DecodeError>) -> Value {
    match decoded {
        Ok(body) => body_summary(body),
        Err(error) => json!({ "error": error.to_string() }),
    }
}

/// Size and hash: enough to tell bodies apart without storing them in the difference.
fn body_summary(body: &[u8]) -> Value {
    json!({
        "size": body.len(),
        "xxh3": format!("{:016x}", xxhash_rust::xxh3::xxh3_64(body)),
    })
}

/// The two summaries reported for bodies that are not JSON and differ in their bytes. When
/// both are text, the first differing line is located so a reader can see what changed without
/// fetching the bodies.
fn bytes_summaries(live: &[u8], shadow: &[u8]) -> (Value, Value) {
    let mut live_summary = body_summary(live);
    let mut shadow_summary = body_summary(shadow);

    if let (Ok(live_text), Ok(shadow_text)) =
        (std::str::from_utf8(live), std::str::from_utf8(shadow))
    {
        let first = first_differing_line(live_text, shadow_text);
        for (summary, line) in [
            (&mut live_summary, first.live),
            (&mut shadow_summary, first.shadow),
        ] {
            if let Value::Object(fields) = summary {
                fields.insert("first_difference_line".to_owned(), json!(first.line));
                fields.insert("first_difference_column".to_owned(), json!(first.column));
                fields.insert(
                    "context".to_owned(),
                    json!(line.map(|l| context(l, first.column - 1))),
                );
            }
        }
    }

    (live_summary, shadow_summary)
}

/// Where two texts first differ: 1-based line and column (in characters), and that line on
/// each side (`None` for a side that has fewer lines).
struct FirstDifference<'a> {
    line: usize,
    column: usize,
    live: Option<&'a str>,
    shadow: Option<&'a str>,
}

fn first_differing_line<'a>(live: &'a str, shadow: &'a str) -> FirstDifference<'a> {
    let mut live_lines = live.split('\n');
    let mut shadow_lines = shadow.split('\n');
    let mut line = 0;
    loop {
        line += 1;
        match (live_lines.next(), shadow_lines.next()) {
            (Some(l), Some(s)) if l == s => continue,
            (live_line, shadow_line) => {
                let column = match (live_line, shadow_line) {
                    (Some(l), Some(s)) => {
                        l.chars().zip(s.chars()).take_while(|(a, b)| a == b).count()
                    }
                    _ => 0,
                };
                return FirstDifference {
                    line,
                    column: column + 1,
                    live: live_line,
                    shadow: shadow_line,
                };
            }
        }
    }
}

/// At most [`CONTEXT_CHARS`] of `line`, starting a little before character `from` so a long
/// line (minified HTML, say) shows the change rather than its unchanged start.
fn context(line: &str, from: usize) -> String {
    line.chars()
        .skip(from.saturating_sub(CONTEXT_LEAD))
        .take(CONTEXT_CHARS)
        .collect()
}

/// Walks two JSON values together, recording each differing leaf under its JSON Pointer.
struct Walker<'w, 'o> {
    route: &'w str,
    options: &'o CompareOptions,
    found: &'w mut Found<'o>,
}

impl Walker<'_, '_> {
    /// Object key order is ignored; arrays are compared position by position, or as multisets
    /// at paths `compare.unordered` names.
    fn diff(&mut self, live: &Value, shadow: &Value, path: &mut String, depth: usize) {
        match (live, shadow) {
            (Value::Object(live_fields), Value::Object(shadow_fields))
                if depth < MAX_JSON_DEPTH =>
            {
                for (key, live_value) in live_fields {
                    let parent_len = path.len();
                    push_pointer_token(path, key);
                    match shadow_fields.get(key) {
                        Some(shadow_value) => self.diff(live_value, shadow_value, path, depth + 1),
                        None => self.record(path, DiffOp::Removed, Some(live_value), None),
                    }
                    path.truncate(parent_len);
                }
                for (key, shadow_value) in shadow_fields {
                    if !live_fields.contains_key(key) {
                        let parent_len = path.len();
                        push_pointer_token(path, key);
                        self.record(path, DiffOp::Added, None, Some(shadow_value));
                        path.truncate(parent_len);
                    }
                }
            }

            (Value::Array(live_items), Value::Array(shadow_items)) if depth < MAX_JSON_DEPTH => {
                let unordered = self
                    .options
                    .unordered
                    .iter()
                    .any(|rule| rule.applies(self.route, path));
                let pairs = if unordered {
                    unordered_pairs(live_items, shadow_items)
                } else {
                    (0..live_items.len().max(shadow_items.len()))
                        .map(|i| {
                            (
                                (i < live_items.len()).then_some(i),
                                (i < shadow_items.len()).then_some(i),
                            )
                        })
                        .collect()
                };
                for pair in pairs {
                    let parent_len = path.len();
                    match pair {
                        (Some(l), Some(s)) => {
                            let _ = write!(path, "/{l}");
                            self.diff(&live_items[l], &shadow_items[s], path, depth + 1);
                        }
                        (Some(l), None) => {
                            let _ = write!(path, "/{l}");
                            self.record(path, DiffOp::Removed, Some(&live_items[l]), None);
                        }
                        (None, Some(s)) => {
                            let _ = write!(path, "/{s}");
                            self.record(path, DiffOp::Added, None, Some(&shadow_items[s]));
                        }
                        (None, None) => {}
                    }
                    path.truncate(parent_len);
                }
            }

            (Value::Number(l), Value::Number(s)) => {
                if !numbers_equal(l, s) {
                    self.record(path, DiffOp::Changed, Some(live), Some(shadow));
                }
            }

            // Containers past the depth limit are compared whole (numbers exactly).
            (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_)) => {
                if live != shadow {
                    self.record(path, DiffOp::Changed, Some(live), Some(shadow));
                }
            }

            // Scalars of one type, or values of different JSON types.
            _ => {
                if std::mem::discriminant(live) != std::mem::discriminant(shadow) {
                    self.record(path, DiffOp::TypeChanged, Some(live), Some(shadow));
                } else if live != shadow {
                    self.record(path, DiffOp::Changed, Some(live), Some(shadow));
                }
            }
        }
    }

    fn record(&mut self, path: &str, op: DiffOp, live: Option<&Value>, shadow: Option<&Value>) {
        self.found.record(DiffKind::Body, path, op, live, shadow);
    }
}

/// Pairs the items of two arrays compared as multisets: equal items (by value, key order and
/// number notation ignored) pair first, whatever their positions; the rest pair in order, so a
/// changed item is still diffed field by field; what is left over was removed or added.
fn unordered_pairs(live: &[Value], shadow: &[Value]) -> Vec<(Option<usize>, Option<usize>)> {
    let mut by_value: HashMap<String, Vec<usize>> = HashMap::new();
    for (index, item) in shadow.iter().enumerate().rev() {
        by_value.entry(canonical(item)).or_default().push(index);
    }

    let mut pairs = Vec::new();
    let mut live_left = Vec::new();
    let mut shadow_taken = vec![false; shadow.len()];
    for (index, item) in live.iter().enumerate() {
        match by_value.get_mut(&canonical(item)).and_then(Vec::pop) {
            Some(s) => shadow_taken[s] = true,
            None => live_left.push(index),
        }
    }
    let shadow_left: Vec<usize> = (0..shadow.len()).filter(|&i| !shadow_taken[i]).collect();
    for i in 0..live_left.len().max(shadow_left.len()) {
        pairs.push((live_left.get(i).copied(), shadow_left.get(i).copied()));
    }
    pairs
}

/// A text form of a JSON value that is equal for values equal by value: object keys sorted,
/// numbers written one way.
fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => out.push_str(&value.to_string()),
        Value::Number(number) => match (integer(number), number.as_f64()) {
            (Some(i), _) => {
                let _ = write!(out, "{i}");
            }
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 1e30 => {
                let _ = write!(out, "{}", f as i128);
            }
            (None, Some(f)) => {
                let _ = write!(out, "{f:e}");
            }
            (None, None) => out.push_str(&number.to_string()),
        },
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&fields[key], out);
            }
            out.push('}');
        }
    }
}

/// Equal by value: integers exactly, anything else as `f64`, so 1, 1.0 and 1e0 are equal.
fn numbers_equal(live: &Number, shadow: &Number) -> bool {
    match (integer(live), integer(shadow)) {
        (Some(l), Some(s)) => l == s,
        _ => match (live.as_f64(), shadow.as_f64()) {
            (Some(l), Some(s)) => l == s,
            _ => live == shadow,
        },
    }
}

fn integer(number: &Number) -> Option<i128> {
    number
        .as_i64()
        .map(i128::from)
        .or_else(|| number.as_u64().map(i128::from))
}

/// Appends one reference token to a JSON Pointer, escaped per RFC 6901 (`~` as `~0`, `/` as
/// `~1`).
fn push_pointer_token(path: &mut String, token: &str) {
    path.push('/');
    for c in token.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

#[cfg(test)]
mod tests;
