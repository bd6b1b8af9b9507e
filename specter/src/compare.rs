//! Compare: decides whether the shadow answered like the live service, and where it did not.
//!
//! It sits between replay and record in the pipeline: replay hands it the live and the shadow
//! response of one exchange, it returns every [`Difference`] between them, and record stores
//! them in the event. An empty list means the exchange matched.
//!
//! What is compared, in this order:
//!
//! - **Status**: one `status` difference when the codes differ.
//! - **Headers**: names case-insensitively, each name's values as an ordered list (two
//!   `Set-Cookie` fields are two values, never folded into one). Names that differ between any
//!   two responses ([`DEFAULT_IGNORED_HEADERS`], configurable) are skipped, and so is
//!   `Content-Encoding`: bodies are compared after decoding, so gzip against identity is not a
//!   divergence by itself.
//! - **Body**: content coding is undone first. When both bodies are JSON they are compared
//!   structurally and each differing leaf is reported under its JSON Pointer; otherwise the
//!   bytes are compared and one difference summarises both bodies.
//!
//! The inputs come from services we do not control, so nothing here may panic or grow without
//! bound: decoded bodies are capped, JSON recursion is capped, and so is the number of body
//! differences kept per exchange.

use std::{
    borrow::Cow,
    collections::HashSet,
    fmt::Write as _,
    io::{self, Read},
};

use flate2::{Decompress, FlushDecompress, Status, read::MultiGzDecoder};
use serde_json::{Number, Value, json};
use thiserror::Error;
use tracing::debug;

use crate::{
    event::{DiffKind, DiffOp, Difference},
    exchange::{Headers, Response},
};

/// Headers ignored by default because they differ between any two responses, even two answers
/// of the same service to the same request. Users can replace the list in the config.
pub const DEFAULT_IGNORED_HEADERS: &[&str] = &[
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
    "x-amzn-trace-id",
    // How long the request took on the server.
    "server-timing",
    "x-runtime",
    "x-response-time",
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

/// Decoded bodies larger than this are not compared: the limit keeps a decompression bomb (a
/// few kilobytes of gzip that inflate to gigabytes) from exhausting memory.
pub const MAX_DECODED_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Body differences kept per exchange. Past this, one more difference with path "" carries
/// `{"truncated_differences": N}` on both sides, N being the total found (kept ones included).
pub const MAX_BODY_DIFFERENCES: usize = 100;

/// Containers nested deeper than this are compared whole and reported as one changed value at
/// their path, so recursion stays bounded. (The JSON parser already refuses input nested deeper
/// than 128, so this is a second guard.)
const MAX_JSON_DEPTH: usize = 128;

/// Longest context string shown for a differing line of a text body, in characters.
const CONTEXT_CHARS: usize = 200;

/// How many characters before the first differing one a context string starts.
const CONTEXT_LEAD: usize = 40;

/// What the comparison ignores.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Header names to skip, lower-case.
    pub ignored_headers: Vec<String>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            ignored_headers: DEFAULT_IGNORED_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
        }
    }
}

impl CompareOptions {
    /// True when differences in `header` (any case) are not reported.
    pub fn ignores(&self, header: &str) -> bool {
        self.ignored_headers
            .iter()
            .any(|h| h.eq_ignore_ascii_case(header))
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

/// Every difference between the live and the shadow response; empty when they match.
pub fn compare(live: &Response, shadow: &Response, options: &CompareOptions) -> Vec<Difference> {
    let mut differences = Vec::new();

    if live.status != shadow.status {
        differences.push(Difference {
            kind: DiffKind::Status,
            path: String::new(),
            op: DiffOp::Changed,
            live: Some(json!(live.status)),
            shadow: Some(json!(shadow.status)),
        });
    }

    compare_headers(&live.headers, &shadow.headers, options, &mut differences);
    compare_bodies(live, shadow, &mut differences);
    differences
}

fn compare_headers(
    live: &Headers,
    shadow: &Headers,
    options: &CompareOptions,
    differences: &mut Vec<Difference>,
) {
    // Names in the order they first appear, live first, so reports read like the responses.
    let mut seen = HashSet::new();
    let mut names = Vec::new();
    for (name, _) in live.iter().chain(shadow.iter()) {
        let name = name.to_ascii_lowercase();
        if options.ignores(&name) || name == "content-encoding" || !seen.insert(name.clone()) {
            continue;
        }
        names.push(name);
    }

    for name in names {
        let live_values = field_values(live, &name);
        let shadow_values = field_values(shadow, &name);
        let op = match (live_values.is_empty(), shadow_values.is_empty()) {
            (false, true) => DiffOp::Removed,
            (true, false) => DiffOp::Added,
            _ if live_values == shadow_values => continue,
            _ => DiffOp::Changed,
        };
        differences.push(Difference {
            kind: DiffKind::Header,
            op,
            live: (!live_values.is_empty()).then(|| values_json(&live_values)),
            shadow: (!shadow_values.is_empty()).then(|| values_json(&shadow_values)),
            path: name,
        });
    }
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

fn compare_bodies(live: &Response, shadow: &Response, differences: &mut Vec<Difference>) {
    let live_codings = content_codings(&live.headers);
    let shadow_codings = content_codings(&shadow.headers);

    // The same bytes under the same codings decode to the same body, so skip the work.
    if live.body == shadow.body && live_codings == shadow_codings {
        return;
    }

    let live_decoded = decode(&live.body, &live_codings);
    let shadow_decoded = decode(&shadow.body, &shadow_codings);
    let (live_body, shadow_body) = match (live_decoded, shadow_decoded) {
        (Ok(live_body), Ok(shadow_body)) => (live_body, shadow_body),

        // A body we cannot read is never taken for a match.
        (live_decoded, shadow_decoded) => {
            if let Err(error) = &live_decoded {
                debug!(%error, "Live body could not be decoded");
            }
            if let Err(error) = &shadow_decoded {
                debug!(%error, "Shadow body could not be decoded");
            }
            differences.push(whole_body_difference(
                decoded_summary(&live_decoded),
                decoded_summary(&shadow_decoded),
            ));
            return;
        }
    };

    if live_body == shadow_body {
        return;
    }

    match (parse_json(&live_body), parse_json(&shadow_body)) {
        (Some(live_json), Some(shadow_json)) => {
            let mut found = BodyDifferences::default();
            diff_json(&live_json, &shadow_json, &mut String::new(), 0, &mut found);
            differences.extend(found.finish());
        }
        _ => differences.push(bytes_difference(&live_body, &shadow_body)),
    }
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

/// The one difference reported when bodies are compared whole rather than field by field.
fn whole_body_difference(live: Value, shadow: Value) -> Difference {
    Difference {
        kind: DiffKind::Body,
        path: String::new(),
        op: DiffOp::Changed,
        live: Some(live),
        shadow: Some(shadow),
    }
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

/// Two bodies that are not both JSON and differ in their bytes. When both are text, the first
/// differing line is located so a reader can see what changed without fetching the bodies.
fn bytes_difference(live: &[u8], shadow: &[u8]) -> Difference {
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

    whole_body_difference(live_summary, shadow_summary)
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

/// Body differences found so far: the first [`MAX_BODY_DIFFERENCES`] kept, all counted.
#[derive(Default)]
struct BodyDifferences {
    kept: Vec<Difference>,
    total: usize,
}

impl BodyDifferences {
    fn record(&mut self, path: &str, op: DiffOp, live: Option<&Value>, shadow: Option<&Value>) {
        self.total += 1;
        if self.kept.len() < MAX_BODY_DIFFERENCES {
            self.kept.push(Difference {
                kind: DiffKind::Body,
                path: path.to_owned(),
                op,
                live: live.cloned(),
                shadow: shadow.cloned(),
            });
        }
    }

    fn finish(mut self) -> Vec<Difference> {
        if self.total > self.kept.len() {
            debug!(
                total = self.total,
                kept = self.kept.len(),
                "Body differences truncated"
            );
            let marker = json!({ "truncated_differences": self.total });
            self.kept
                .push(whole_body_difference(marker.clone(), marker));
        }
        self.kept
    }
}

/// Walks both values together and records each differing leaf under its JSON Pointer `path`.
/// Object key order is ignored; arrays are compared position by position.
fn diff_json(
    live: &Value,
    shadow: &Value,
    path: &mut String,
    depth: usize,
    found: &mut BodyDifferences,
) {
    match (live, shadow) {
        (Value::Object(live_fields), Value::Object(shadow_fields)) if depth < MAX_JSON_DEPTH => {
            for (key, live_value) in live_fields {
                let parent_len = path.len();
                push_pointer_token(path, key);
                match shadow_fields.get(key) {
                    Some(shadow_value) => {
                        diff_json(live_value, shadow_value, path, depth + 1, found)
                    }
                    None => found.record(path, DiffOp::Removed, Some(live_value), None),
                }
                path.truncate(parent_len);
            }
            for (key, shadow_value) in shadow_fields {
                if !live_fields.contains_key(key) {
                    let parent_len = path.len();
                    push_pointer_token(path, key);
                    found.record(path, DiffOp::Added, None, Some(shadow_value));
                    path.truncate(parent_len);
                }
            }
        }

        (Value::Array(live_items), Value::Array(shadow_items)) if depth < MAX_JSON_DEPTH => {
            for index in 0..live_items.len().max(shadow_items.len()) {
                let parent_len = path.len();
                let _ = write!(path, "/{index}");
                match (live_items.get(index), shadow_items.get(index)) {
                    (Some(l), Some(s)) => diff_json(l, s, path, depth + 1, found),
                    (Some(l), None) => found.record(path, DiffOp::Removed, Some(l), None),
                    (None, Some(s)) => found.record(path, DiffOp::Added, None, Some(s)),
                    (None, None) => {}
                }
                path.truncate(parent_len);
            }
        }

        (Value::Number(l), Value::Number(s)) => {
            if !numbers_equal(l, s) {
                found.record(path, DiffOp::Changed, Some(live), Some(shadow));
            }
        }

        // Scalars, values of different JSON types, and containers past the depth limit (which
        // are compared whole, numbers exactly).
        _ => {
            if live != shadow {
                found.record(path, DiffOp::Changed, Some(live), Some(shadow));
            }
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
