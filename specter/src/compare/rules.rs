//! The user's comparison rules from `compare.ignore` and `compare.unordered`, and the JSON path
//! patterns they are written with.

use crate::{
    config::{IgnoreRuleConfig, UnorderedRuleConfig},
    profile::RoutePattern,
};

/// A JSON Pointer pattern: tokens separated by `/` as in a pointer (`~0` and `~1` escapes
/// included), where `*` matches one token and `**` any number of tokens, none included.
/// `""` names the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    tokens: Vec<PathToken>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathToken {
    Literal(String),
    One,
    Any,
}

impl PathPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self { tokens: Vec::new() });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("`{text}` does not start with `/`"));
        };
        let tokens = rest
            .split('/')
            .map(|token| match token {
                "*" => PathToken::One,
                "**" => PathToken::Any,
                literal => PathToken::Literal(literal.to_owned()),
            })
            .collect();
        Ok(Self { tokens })
    }

    /// True when the JSON Pointer `path` falls under the pattern.
    pub fn matches(&self, path: &str) -> bool {
        let tokens: Vec<&str> = match path.strip_prefix('/') {
            Some(rest) => rest.split('/').collect(),
            None if path.is_empty() => Vec::new(),
            None => return false,
        };
        matches_tokens(&self.tokens, &tokens)
    }
}

fn matches_tokens(pattern: &[PathToken], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((PathToken::Any, rest)) => {
            (0..=path.len()).any(|skip| matches_tokens(rest, &path[skip..]))
        }
        Some((PathToken::One, rest)) => !path.is_empty() && matches_tokens(rest, &path[1..]),
        Some((PathToken::Literal(literal), rest)) => {
            path.first() == Some(&literal.as_str()) && matches_tokens(rest, &path[1..])
        }
    }
}

/// What a `compare.ignore` entry leaves out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// A header name, lower-case.
    Header(String),
    /// Body differences at paths matching the pattern.
    Path(PathPattern),
}

/// One `compare.ignore` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoreRule {
    /// Only on routes matching this pattern; every route when `None`.
    pub route: Option<RoutePattern>,
    pub ignored: Ignored,
}

/// One `compare.unordered` entry: arrays at matching paths are compared as multisets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnorderedRule {
    pub route: Option<RoutePattern>,
    pub path: PathPattern,
}

impl IgnoreRule {
    /// Builds the rule from its config entry. The config was validated, so an entry that
    /// still does not parse is left out rather than failing.
    pub fn from_config(entry: &IgnoreRuleConfig) -> Option<Self> {
        let route = match &entry.route {
            Some(text) => Some(RoutePattern::parse(text).ok()?),
            None => None,
        };
        let ignored = match (&entry.header, &entry.path) {
            (Some(header), None) => Ignored::Header(header.to_ascii_lowercase()),
            (None, Some(path)) => Ignored::Path(PathPattern::parse(path).ok()?),
            _ => return None,
        };
        Some(Self { route, ignored })
    }

    pub(super) fn applies_to(&self, route: &str) -> bool {
        self.route.as_ref().is_none_or(|p| p.matches_route(route))
    }
}

impl UnorderedRule {
    pub fn from_config(entry: &UnorderedRuleConfig) -> Option<Self> {
        let route = match &entry.route {
            Some(text) => Some(RoutePattern::parse(text).ok()?),
            None => None,
        };
        Some(Self {
            route,
            path: PathPattern::parse(&entry.path).ok()?,
        })
    }

    pub(super) fn applies(&self, route: &str, path: &str) -> bool {
        self.route.as_ref().is_none_or(|p| p.matches_route(route)) && self.path.matches(path)
    }
}
