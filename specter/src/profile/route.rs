//! Routes: the names exchanges are grouped under, so every counter is kept per endpoint rather
//! than per URL.
//!
//! A route is the method and a path template, e.g. `GET /users/{id}`. Configured patterns
//! (`routes.patterns`) win; otherwise the template is made automatically: segments that look
//! like identifiers (numbers, UUIDs, long hex strings, long tokens mixing letters and digits)
//! become `{id}`, and a segment position that has shown more than `routes.max_segment_values`
//! distinct literal values is treated as a variable too, so ten thousand random file names under
//! one prefix make one route, not ten thousand.

use std::collections::HashMap;

/// The placeholder an automatic template puts where an identifier was.
pub const ID_SEGMENT: &str = "{id}";

/// Literal segments the automatic templates remember at most, over all positions. Past it, an
/// unknown segment is templated as `{id}` wherever it appears, so memory stays bounded even
/// when traffic has deep, ever-changing paths.
const MAX_TEMPLATE_NODES: usize = 20_000;

/// A route pattern from the config: `METHOD /path/segments`, where the method may be `*` (or
/// left out) for any method, a path segment `*` or `{name}` matches one segment, and a last
/// segment `**` matches the rest of the path (including nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
    /// Upper-cased; `None` for any method.
    method: Option<String>,
    /// The path as written, e.g. `/users/{id}`.
    path: String,
    segments: Vec<PatternSegment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternSegment {
    Literal(String),
    /// `*` or `{name}`: exactly one segment.
    One,
    /// `**`: any number of segments, only last.
    Rest,
}

impl RoutePattern {
    /// Parses `GET /users/{id}`, `* /static/**` or `/health`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (method, path) = match text.split_once(' ') {
            Some((method, path)) => (method.trim(), path.trim()),
            None => ("*", text),
        };
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                Some(m.to_ascii_uppercase())
            }
            m => return Err(format!("`{m}` is not an HTTP method or `*`")),
        };
        if !path.starts_with('/') {
            return Err(format!("the path `{path}` does not start with `/`"));
        }

        let parts: Vec<&str> = split_path(path).collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "**" if i + 1 == parts.len() => PatternSegment::Rest,
                "**" => return Err("`**` may only be the last segment".to_owned()),
                "*" => PatternSegment::One,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => PatternSegment::One,
                p => PatternSegment::Literal(p.to_owned()),
            };
            segments.push(segment);
        }
        Ok(Self {
            method,
            path: path.to_owned(),
            segments,
        })
    }

    /// The route an exchange with this method and path belongs to, when the pattern matches.
    pub fn route_for(&self, method: &str, path: &str) -> Option<String> {
        if self
            .method
            .as_deref()
            .is_some_and(|m| !m.eq_ignore_ascii_case(method))
        {
            return None;
        }
        self.matches_segments(split_path(path))
            .then(|| format!("{method} {}", self.path))
    }

    /// True when a route name (`GET /users/{id}`) falls under this pattern. A placeholder in
    /// the route is a segment like any other, so `GET /users/*` covers `GET /users/{id}`.
    pub fn matches_route(&self, route: &str) -> bool {
        let Some((method, path)) = route.split_once(' ') else {
            return false;
        };
        if self
            .method
            .as_deref()
            .is_some_and(|m| !m.eq_ignore_ascii_case(method))
        {
            return false;
        }
        self.matches_segments(split_path(path))
    }

    fn matches_segments<'a>(&self, mut path: impl Iterator<Item = &'a str>) -> bool {
        for segment in &self.segments {
            match segment {
                PatternSegment::Rest => return true,
                PatternSegment::One => {
                    if path.next().is_none() {
                        return false;
                    }
                }
                PatternSegment::Literal(literal) => {
                    if path.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        path.next().is_none()
    }
}

/// The segments of a path after its leading `/`; `/` alone has none.
fn split_path(path: &str) -> impl Iterator<Item = &str> {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split('/').filter({
        let empty = path.is_empty();
        move |_| !empty
    })
}

/// The route an exchange belongs to without any learned state: the method and the path with
/// id-like segments replaced by `{id}`, so `/users/123` and `/users/456` are one route.
pub fn route_of(method: &str, path: &str) -> String {
    let mut route = String::with_capacity(method.len() + path.len() + 1);
    route.push_str(method);
    route.push(' ');
    if path.is_empty() || path == "/" {
        route.push('/');
        return route;
    }
    for segment in path.split('/').skip(1) {
        route.push('/');
        if is_id_like(segment) {
            route.push_str(ID_SEGMENT);
        } else {
            route.push_str(segment);
        }
    }
    route
}

/// True for a path segment that names one thing among many: a number, a UUID, a hex string of
/// 16 digits or more, or a token of 20 characters or more that mixes letters and digits (base64
/// ids, slugs with a random tail).
pub fn is_id_like(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    let numeric = !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit);
    let uuid = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    let long_hex = bytes.len() >= 16 && bytes.iter().all(u8::is_ascii_hexdigit);
    let long_token = bytes.len() >= 20
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'='))
        && bytes.iter().any(u8::is_ascii_digit)
        && bytes.iter().any(u8::is_ascii_alphabetic);
    numeric || uuid || long_hex || long_token
}

/// One position in the learned templates: the literal segments seen there and where each leads.
#[derive(Debug, Default)]
struct Node {
    literals: HashMap<String, Node>,
    /// Where `{id}` (an id-like segment, or any segment once the position is saturated) leads.
    variable: Option<Box<Node>>,
    /// More distinct literals than the limit were seen here: every segment is `{id}` now.
    saturated: bool,
}

/// The automatic templates, learned from the paths seen, and the configured patterns.
#[derive(Debug)]
pub struct RouteTemplates {
    patterns: Vec<RoutePattern>,
    max_segment_values: usize,
    /// One tree per method.
    roots: HashMap<String, Node>,
    nodes: usize,
}

/// What [`RouteTemplates::route`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Routed {
    pub route: String,
    /// A segment position became a variable while templating this path: routes named before
    /// with a literal there should now be named again with [`RouteTemplates::canonical`].
    pub saturated: bool,
}

impl RouteTemplates {
    pub fn new(patterns: Vec<RoutePattern>, max_segment_values: usize) -> Self {
        Self {
            patterns,
            max_segment_values: max_segment_values.max(1),
            roots: HashMap::new(),
            nodes: 0,
        }
    }

    /// The route of an exchange, learning the path's segments.
    pub fn route(&mut self, method: &str, path: &str) -> Routed {
        if let Some(route) = self.patterns.iter().find_map(|p| p.route_for(method, path)) {
            return Routed {
                route,
                saturated: false,
            };
        }

        let mut route = format!("{method} ");
        let mut saturated = false;
        let max = self.max_segment_values;
        let budget_left = |nodes: usize| nodes < MAX_TEMPLATE_NODES;
        let mut nodes = self.nodes;
        let mut node = self.roots.entry(method.to_owned()).or_default();
        let mut any = false;
        for segment in split_path(path) {
            any = true;
            route.push('/');
            let variable = is_id_like(segment)
                || segment == ID_SEGMENT
                || node.saturated
                || (!node.literals.contains_key(segment)
                    && (node.literals.len() >= max || !budget_left(nodes)));
            if variable {
                // Seeing one literal too many turns the whole position into a variable; the
                // literals learned so far are forgotten, and their routes renamed by the caller.
                if !is_id_like(segment)
                    && segment != ID_SEGMENT
                    && !node.saturated
                    && node.literals.len() >= max
                {
                    node.saturated = true;
                    saturated = true;
                    nodes = nodes.saturating_sub(count(&node.literals));
                    node.literals.clear();
                }
                route.push_str(ID_SEGMENT);
                node = node.variable.get_or_insert_with(|| {
                    nodes += 1;
                    Box::default()
                });
            } else {
                route.push_str(segment);
                node = node.literals.entry(segment.to_owned()).or_insert_with(|| {
                    nodes += 1;
                    Node::default()
                });
            }
        }
        if !any {
            route.push('/');
        }
        self.nodes = nodes;
        Routed { route, saturated }
    }

    /// A route name made earlier, with every position that has since become a variable
    /// replaced by `{id}`. Learns nothing; names it cannot walk are kept as they are.
    pub fn canonical(&self, route: &str) -> String {
        let Some((method, path)) = route.split_once(' ') else {
            return route.to_owned();
        };
        if self
            .patterns
            .iter()
            .any(|p| p.route_for(method, path).is_some())
        {
            return route.to_owned();
        }
        let Some(mut node) = self.roots.get(method) else {
            return route.to_owned();
        };

        let mut canonical = format!("{method} ");
        let mut segments = split_path(path);
        let mut any = false;
        for segment in segments.by_ref() {
            any = true;
            canonical.push('/');
            let next = if node.saturated || segment == ID_SEGMENT {
                canonical.push_str(ID_SEGMENT);
                node.variable.as_deref()
            } else {
                canonical.push_str(segment);
                node.literals.get(segment)
            };
            match next {
                Some(next) => node = next,
                None => break,
            }
        }
        for segment in segments {
            canonical.push('/');
            canonical.push_str(segment);
        }
        if !any {
            canonical.push('/');
        }
        canonical
    }
}

/// How many nodes hang below these literals, themselves included.
fn count(literals: &HashMap<String, Node>) -> usize {
    literals.values().map(|n| 1 + descendants(n)).sum()
}

fn descendants(node: &Node) -> usize {
    count(&node.literals) + node.variable.as_deref().map_or(0, |v| 1 + descendants(v))
}
