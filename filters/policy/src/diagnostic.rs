//! Errors that point at the place in the policy that caused them.
//!
//! A TOML policy is written by hand, so every error carries the byte span of
//! the offending key or value and renders like rustc: `file:line:column`, the
//! line itself, a caret under the culprit, and a hint. A JSON policy (what
//! Istio's `pluginConfig` becomes) has no useful spans once parsed, so its
//! errors name the field by JSON pointer (`/tokens/quota/0/tokens`).

use std::fmt;
use std::ops::Range;

use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};

/// Where something is in a policy document.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Loc {
    /// JSON pointer of the value (`""` for the document itself).
    pub pointer: String,
    /// Byte range in the source text, when the source was TOML.
    pub span: Option<Range<usize>>,
}

impl Loc {
    /// The location of `key` inside the value at `self`.
    pub fn child(&self, key: &str, span: Option<Range<usize>>) -> Loc {
        let escaped = key.replace('~', "~0").replace('/', "~1");
        Loc {
            pointer: format!("{}/{escaped}", self.pointer),
            span,
        }
    }
}

/// One problem found in a policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    pub loc: Loc,
    pub message: String,
    /// What to do about it, when there is something better to say than the message.
    pub hint: Option<String>,
}

impl Diagnostic {
    pub fn new(loc: &Loc, message: impl Into<String>) -> Self {
        Self {
            loc: loc.clone(),
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// A 1-based line and column (in characters) in a source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineCol {
    pub line: usize,
    pub column: usize,
}

/// The text a policy was read from, and what to call it in messages.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
    pub format: Format,
}

/// The syntax of a policy document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>, format: Format) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
            format,
        }
    }

    /// Line and column of byte `offset` (clamped to the text).
    pub fn line_col(&self, offset: usize) -> LineCol {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        LineCol { line, column }
    }
}

/// All the problems found in one policy document.
#[derive(Clone, Debug)]
pub struct Diagnostics {
    pub source: Source,
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    /// Line and column of a diagnostic, when its location has a span.
    pub fn line_col(&self, d: &Diagnostic) -> Option<LineCol> {
        d.loc.span.as_ref().map(|s| self.source.line_col(s.start))
    }

    /// One line per diagnostic: `file:line:col: message` (TOML) or
    /// `file: at /pointer: message` (JSON); for logs, where carets don't fit.
    pub fn to_compact_string(&self) -> String {
        let mut out = String::new();
        for d in &self.items {
            let place = match self.line_col(d) {
                Some(lc) => format!("{}:{}:{}", self.source.name, lc.line, lc.column),
                None => format!(
                    "{}: at {}",
                    self.source.name,
                    pointer_or_root(&d.loc.pointer)
                ),
            };
            out.push_str(&format!("{place}: {}", d.message));
            if let Some(hint) = &d.hint {
                out.push_str(&format!(" (hint: {hint})"));
            }
            out.push('\n');
        }
        out
    }

    /// rustc-style rendering with the source line and a caret; `styled`
    /// adds terminal colours.
    pub fn render(&self, styled: bool) -> String {
        let renderer = if styled {
            Renderer::styled()
        } else {
            Renderer::plain()
        };
        let mut out = String::new();
        for d in &self.items {
            let title = Level::ERROR.primary_title(d.message.as_str());
            let group = match &d.loc.span {
                Some(span) => {
                    let span = clamp_span(span, &self.source.text);
                    let snippet = Snippet::source(self.source.text.as_str())
                        .path(self.source.name.as_str())
                        .fold(true)
                        .annotation(AnnotationKind::Primary.span(span));
                    title.element(snippet)
                }
                None => title.element(Level::NOTE.message(format!(
                    "in {} at {}",
                    self.source.name,
                    pointer_or_root(&d.loc.pointer)
                ))),
            };
            let group = match &d.hint {
                Some(hint) => group.element(Level::HELP.message(hint.as_str())),
                None => group,
            };
            let report: [Group<'_>; 1] = [group];
            out.push_str(&renderer.render(&report));
            out.push_str("\n\n");
        }
        let n = self.items.len();
        out.push_str(&format!(
            "error: {} is invalid: {n} error{}\n",
            self.source.name,
            if n == 1 { "" } else { "s" }
        ));
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_compact_string())
    }
}

impl std::error::Error for Diagnostics {}

fn pointer_or_root(pointer: &str) -> &str {
    if pointer.is_empty() { "/" } else { pointer }
}

/// A non-empty span inside `text` on char boundaries, so the caret has
/// something to point at even for an empty or past-the-end span.
fn clamp_span(span: &Range<usize>, text: &str) -> Range<usize> {
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = span.end.clamp(start, text.len());
    while !text.is_char_boundary(end) {
        end += 1;
    }
    if end == start {
        // Point at the character here, or the one before the end of text.
        match text[start..].chars().next() {
            Some(c) if c != '\n' => end = start + c.len_utf8(),
            _ => {}
        }
    }
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_not_bytes() {
        let s = Source::new("p.toml", "a = 1\nbé = \"x\"\n", Format::Toml);
        assert_eq!(s.line_col(0), LineCol { line: 1, column: 1 });
        assert_eq!(s.line_col(6), LineCol { line: 2, column: 1 });
        // The byte after "bé" ("b" is 1 byte, "é" 2) is column 3.
        assert_eq!(s.line_col(9), LineCol { line: 2, column: 3 });
    }

    #[test]
    fn renders_file_line_and_caret() {
        let source = Source::new("p.toml", "[retry]\nbudget = \"20\"\n", Format::Toml);
        let d = Diagnostic::new(
            &Loc {
                pointer: "/retry/budget".into(),
                span: Some(17..21),
            },
            "bad",
        )
        .with_hint("write a percentage");
        let diags = Diagnostics {
            source,
            items: vec![d],
        };
        let text = diags.render(false);
        assert!(text.contains("p.toml:2:10"), "{text}");
        assert!(text.contains("^^^^"), "{text}");
        assert!(text.contains("write a percentage"), "{text}");
        assert_eq!(
            diags.to_compact_string(),
            "p.toml:2:10: bad (hint: write a percentage)\n"
        );
    }

    #[test]
    fn json_errors_name_the_pointer() {
        let source = Source::new("plugin", "{}", Format::Json);
        let d = Diagnostic::new(
            &Loc {
                pointer: "/retry/budget".into(),
                span: None,
            },
            "bad",
        );
        let diags = Diagnostics {
            source,
            items: vec![d],
        };
        assert_eq!(diags.to_compact_string(), "plugin: at /retry/budget: bad\n");
        assert!(diags.render(false).contains("/retry/budget"));
    }
}
