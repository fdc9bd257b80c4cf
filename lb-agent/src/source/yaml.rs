//! A fast reader for the plain block-style YAML that `kubectl get -o yaml` and people write,
//! straight into serde types; any document outside its subset is left to serde_yaml.
//!
//! The manifests source reads 200,000 documents at 100k Services. serde_yaml turns each into
//! libyaml events (an allocation per token) before serde sees any of it, and that was 80% of
//! the read. This reader borrows: a document becomes a small tree of `&str` slices of the
//! text, deserialized in place.
//!
//! **The subset.** Block mappings and sequences (including `- key: value` items), plain and
//! single- or double-quoted scalars on one line, flow sequences and mappings on one line,
//! comments. Anything else (anchors and aliases, tags, block scalars `|` `>`, multi-line
//! scalars and flow collections, complex keys, duplicate keys, tabs in indentation,
//! numbers other than plain decimal integers where their type would be guessed) makes
//! [`from_str`] return `None`, and the caller parses the document with serde_yaml.
//!
//! **Same answers as serde_yaml.** Where this reader gives a value, it is the one
//! serde_yaml gives: scalars resolve as in serde_yaml 0.9 (`~`, `null`, `Null`, `NULL` and
//! the empty plain scalar are null; `true`/`True`/`TRUE` and the false forms are booleans;
//! a string field takes any scalar's text), and where a type would have to guess beyond
//! null, bool and a decimal integer, it declines. Where serde_yaml would fail, this reader
//! fails too, so that the caller's serde_yaml path reports the problem. The tests compare
//! the two on every kind of document the agent reads.
use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};

/// One parsed document (without its `---`), borrowing its text.
pub struct Doc<'a>(Node<'a>);

impl<'a> Doc<'a> {
    /// `None` when the document is outside this reader's subset.
    pub fn parse(text: &'a str) -> Option<Self> {
        parse(text).map(Doc)
    }

    pub fn root(&self) -> Value<'_> {
        Value(&self.0)
    }
}

/// A node of a [`Doc`].
#[derive(Clone, Copy)]
pub struct Value<'n>(&'n Node<'n>);

impl<'n> Value<'n> {
    /// The value of `key` in a mapping.
    pub fn get(self, key: &str) -> Option<Value<'n>> {
        match self.0 {
            Node::Map(entries) => entries
                .iter()
                .find(|(k, _)| k.text == key)
                .map(|(_, v)| Value(v)),
            _ => None,
        }
    }

    /// A scalar that serde_yaml reads as a string (not null, a boolean or a number).
    pub fn as_str(self) -> Option<&'n str> {
        match self.0 {
            Node::Scalar(s) if s.is_string() => Some(&s.text),
            _ => None,
        }
    }

    /// A sequence's items; a null is an empty sequence. `None` for anything else.
    pub fn items(self) -> Option<impl ExactSizeIterator<Item = Value<'n>>> {
        match self.0 {
            Node::Seq(items) => Some(items.iter().map(Value)),
            Node::Scalar(s) if s.is_null() => Some([].iter().map(Value)),
            _ => None,
        }
    }

    /// The node as a `T`, as `serde_yaml::from_str` reads a document (a string field takes
    /// any scalar's text), or `None` when it does not fit.
    pub fn deserialize<T: DeserializeOwned>(self) -> Option<T> {
        T::deserialize(De::new(self.0, Mode::Document)).ok()
    }

    /// The node as a `T`, as `serde_yaml::from_value` reads a `serde_yaml::Value` (scalars
    /// typed first: a string field takes only a string), or `None` when it does not fit.
    pub fn deserialize_as_value<T: DeserializeOwned>(self) -> Option<T> {
        T::deserialize(De::new(self.0, Mode::Value)).ok()
    }
}

/// A parsed node: scalars borrow the text unless an escape had to be resolved.
#[derive(Debug, PartialEq)]
enum Node<'a> {
    Scalar(Scalar<'a>),
    Seq(Vec<Node<'a>>),
    Map(Vec<(Scalar<'a>, Node<'a>)>),
}

#[derive(Debug, PartialEq)]
struct Scalar<'a> {
    text: Cow<'a, str>,
    /// Plain (unquoted): its type is resolved from its text.
    plain: bool,
}

impl<'a> Scalar<'a> {
    fn plain(text: &'a str) -> Self {
        Scalar {
            text: Cow::Borrowed(text),
            plain: true,
        }
    }

    /// The empty plain scalar, as a key with no value has.
    fn empty() -> Self {
        Self::plain("")
    }

    fn is_null(&self) -> bool {
        self.plain && matches!(&*self.text, "" | "~" | "null" | "Null" | "NULL")
    }

    fn as_bool(&self) -> Option<bool> {
        if !self.plain {
            return None;
        }
        match &*self.text {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => None,
        }
    }

    /// A plain decimal integer: `0` or an optional `-` and digits without a leading zero.
    fn as_int(&self) -> Option<Int> {
        if !self.plain {
            return None;
        }
        let t = &*self.text;
        let (neg, digits) = match t.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, t),
        };
        let decimal = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        if !decimal || (neg && digits == "0") {
            return None;
        }
        if neg {
            t.parse().ok().map(Int::Neg)
        } else {
            t.parse().ok().map(Int::Pos)
        }
    }

    /// Plain text that serde_yaml reads as a number (any integer or float form).
    fn is_number(&self) -> bool {
        self.plain && is_number(&self.text)
    }

    /// Plain text that serde_yaml reads as a string (not null, a boolean or a number).
    fn is_string(&self) -> bool {
        !self.plain || !(self.is_null() || self.as_bool().is_some() || self.is_number())
    }
}

/// Whether serde_yaml 0.9 resolves the plain scalar `s` to a number: its integer forms
/// (decimal, `0x`, `0o`, `0b`, signed, up to 128 bits) and its floats (Rust's syntax,
/// finite, and `.inf`, `.nan` spelled three ways), minus the digits with a leading zero
/// that YAML 1.2 calls a string.
fn is_number(s: &str) -> bool {
    if !s.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '.')) {
        return false; // the common case: a name
    }
    let leading_zero = {
        let d = s.strip_prefix(['-', '+']).unwrap_or(s);
        d.len() > 1 && d.starts_with('0') && d[1..].bytes().all(|b| b.is_ascii_digit())
    };
    let radix = [("0x", 16), ("0o", 8), ("0b", 2)];
    let unpositive = s.strip_prefix('+').unwrap_or(s);
    let unsigned = radix.iter().any(|&(p, r)| {
        unpositive.strip_prefix(p).is_some_and(|rest| {
            !rest.starts_with(['+', '-']) && u128::from_str_radix(rest, r).is_ok()
        })
    }) || (!unpositive.starts_with(['+', '-'])
        && !leading_zero
        && unpositive.parse::<u128>().is_ok());
    let negative = radix.iter().any(|&(p, r)| {
        s.strip_prefix('-')
            .and_then(|n| n.strip_prefix(p))
            .is_some_and(|rest| i128::from_str_radix(&format!("-{rest}"), r).is_ok())
    }) || (!leading_zero && s.parse::<i128>().is_ok());
    let float = !leading_zero && {
        let plus = s.strip_prefix('+');
        let unpositive = plus.unwrap_or(s);
        if plus.is_some_and(|u| u.starts_with(['+', '-'])) {
            false
        } else {
            matches!(unpositive, ".inf" | ".Inf" | ".INF")
                || matches!(s, "-.inf" | "-.Inf" | "-.INF" | ".nan" | ".NaN" | ".NAN")
                || unpositive.parse::<f64>().is_ok_and(f64::is_finite)
        }
    };
    unsigned || negative || float
}

#[derive(Clone, Copy)]
enum Int {
    Pos(u64),
    Neg(i64),
}

// ---------------------------------------------------------------------------------------
// Parsing

/// A content line: its indentation and its text (without the line break).
struct Line<'a> {
    indent: usize,
    text: &'a str,
}

/// Reads a document's lines one at a time (no line table: the parser looks at one line
/// and the next only).
struct Parser<'a> {
    doc: &'a str,
    /// Where the line after the current one begins.
    pos: usize,
    /// The current content line; `None` past the end.
    cur: Option<Line<'a>>,
    /// Block collections open.
    depth: usize,
}

/// How deep collections may nest (serde_yaml stops at 128): Kubernetes objects nest about
/// ten levels; a deeper document is left to serde_yaml, which reports it.
const MAX_DEPTH: usize = 100;

fn parse(doc: &str) -> Option<Node<'_>> {
    let ascii_text = doc.bytes().all(|b| matches!(b, b' '..=b'~' | b'\n'));
    if !ascii_text && !printable(doc) {
        return None;
    }
    let mut p = Parser {
        doc,
        pos: 0,
        cur: None,
        depth: 0,
    };
    p.advance()?;
    let first = p.cur.as_ref()?.indent;
    let node = p.block(first)?;
    p.cur.is_none().then_some(node)
}

/// Only characters libyaml reads as printable, and `\n` (or `\r\n`) line breaks: a lone
/// `\r`, NEL or a Unicode line separator also breaks a line for libyaml, and a control
/// character is an error there.
fn printable(doc: &str) -> bool {
    let mut chars = doc.chars().peekable();
    while let Some(c) = chars.next() {
        let ok = match c {
            '\n' | '\t' | ' '..='~' => true,
            '\r' => chars.peek() == Some(&'\n'),
            '\u{2028}' | '\u{2029}' | '\u{feff}' => false,
            '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'.. => true,
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// `rest` (from a node's column) starts a block sequence entry.
fn is_entry(rest: &str) -> bool {
    rest == "-" || rest.starts_with("- ")
}

/// Only a comment, or nothing, follows.
fn is_end(rest: &str) -> bool {
    let r = rest.trim_start_matches(' ');
    r.is_empty() || r.starts_with('#')
}

impl<'a> Parser<'a> {
    fn line(&self) -> Option<&Line<'a>> {
        self.cur.as_ref()
    }

    /// Move to the next content line (blank lines and comment lines skipped); `None` when
    /// that line is outside the subset (a tab in it).
    fn advance(&mut self) -> Option<()> {
        self.cur = None;
        while self.pos < self.doc.len() {
            let rest = &self.doc[self.pos..];
            let (raw, next) = match rest.find('\n') {
                Some(i) => (&rest[..i], self.pos + i + 1),
                None => (rest, self.doc.len()),
            };
            self.pos = next;
            let text = raw.strip_suffix('\r').unwrap_or(raw);
            let body = text.trim_start_matches(' ');
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            if body.contains('\t') {
                return None;
            }
            self.cur = Some(Line {
                indent: text.len() - body.len(),
                text,
            });
            return Some(());
        }
        Some(())
    }

    /// The text of the current line from column `col`.
    fn rest(&self, col: usize) -> Option<&'a str> {
        let l = self.line()?;
        l.text.get(col..)
    }

    /// A block node beginning at column `col` of the current line: a sequence or a mapping.
    fn block(&mut self, col: usize) -> Option<Node<'a>> {
        let rest = self.rest(col)?;
        if is_entry(rest) {
            self.seq(col)
        } else if map_key(rest).is_some() {
            self.map(col)
        } else {
            None // a scalar on a line of its own (multi-line, or a document of one scalar)
        }
    }

    /// After a node ended on the line before: the indentation of the next line, if any.
    fn next_indent(&self) -> Option<usize> {
        self.line().map(|l| l.indent)
    }

    /// The node of an entry or key whose value is on the following lines (`parent` is the
    /// entry's or key's column): a deeper block, or null.
    fn nested(&mut self, parent: usize) -> Option<Node<'a>> {
        match self.next_indent() {
            Some(i) if i > parent => self.block(i),
            _ => Some(Node::Scalar(Scalar::empty())),
        }
    }

    /// A block sequence at column `col`, no deeper than [`MAX_DEPTH`] (a deeper document is
    /// declined, not a stack overflow).
    fn seq(&mut self, col: usize) -> Option<Node<'a>> {
        self.nest(|p| p.seq_at(col))
    }

    fn seq_at(&mut self, col: usize) -> Option<Node<'a>> {
        let mut items = Vec::new();
        loop {
            let rest = self.rest(col)?;
            let after = rest.get(1..)?;
            let item = if is_end(after) {
                self.advance()?;
                self.nested(col)?
            } else {
                let body = after.trim_start_matches(' ');
                let c = col + 1 + (after.len() - body.len());
                if is_entry(body) {
                    self.seq(c)?
                } else if map_key(body).is_some() {
                    self.map(c)?
                } else {
                    let v = inline(body)?;
                    self.advance()?;
                    if self.next_indent().is_some_and(|i| i > col) {
                        return None; // a continuation line
                    }
                    v
                }
            };
            items.push(item);
            match self.line() {
                Some(l) if l.indent == col && is_entry(&l.text[col..]) => continue,
                Some(l) if l.indent > col => return None,
                _ => return Some(Node::Seq(items)),
            }
        }
    }

    /// A block mapping at column `col`, no deeper than [`MAX_DEPTH`].
    fn map(&mut self, col: usize) -> Option<Node<'a>> {
        self.nest(|p| p.map_at(col))
    }

    /// `f` one level deeper; `None` past [`MAX_DEPTH`].
    fn nest(&mut self, f: impl FnOnce(&mut Self) -> Option<Node<'a>>) -> Option<Node<'a>> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        self.depth += 1;
        let node = f(self);
        self.depth -= 1;
        node
    }

    fn map_at(&mut self, col: usize) -> Option<Node<'a>> {
        let mut entries: Vec<(Scalar<'a>, Node<'a>)> = Vec::new();
        loop {
            let rest = self.rest(col)?;
            let (key, after) = map_key(rest)?;
            let value = if is_end(after) {
                self.advance()?;
                match self.line() {
                    // A sequence may sit at its key's own indentation.
                    Some(l) if l.indent == col && is_entry(&l.text[col..]) => self.seq(col)?,
                    _ => self.nested(col)?,
                }
            } else {
                let v = inline(after.trim_start_matches(' '))?;
                self.advance()?;
                v
            };
            if entries.iter().any(|(k, _)| k.text == key.text) {
                return None; // what serde_yaml makes of it is its own business
            }
            entries.push((key, value));
            match self.line() {
                Some(l) if l.indent == col && !is_entry(&l.text[col..]) => continue,
                Some(l) if l.indent >= col => return None,
                _ => return Some(Node::Map(entries)),
            }
        }
    }
}

/// Characters a plain scalar may not begin with.
fn bad_start(s: &str) -> bool {
    let b = s.as_bytes();
    let Some(&c) = b.first() else {
        return true;
    };
    let spaced = |i: usize| b.get(i).is_none_or(|&c| c == b' ');
    matches!(
        c,
        b',' | b'['
            | b']'
            | b'{'
            | b'}'
            | b'#'
            | b'&'
            | b'*'
            | b'!'
            | b'|'
            | b'>'
            | b'\''
            | b'"'
            | b'%'
            | b'@'
            | b'`'
    ) || (matches!(c, b'-' | b'?' | b':') && spaced(1))
}

/// A block mapping key at the start of `rest`, and the text after its `:`.
fn map_key(rest: &str) -> Option<(Scalar<'_>, &str)> {
    if rest.starts_with(['"', '\'']) {
        let (key, after) = quoted(rest)?;
        let after = after.strip_prefix(':')?;
        return (after.is_empty() || after.starts_with(' ')).then_some((key, after));
    }
    if bad_start(rest) {
        return None;
    }
    let b = rest.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b':' if b.get(i + 1).is_none_or(|&n| n == b' ') => {
                let key = rest[..i].trim_end_matches(' ');
                return Some((Scalar::plain(key), &rest[i + 1..]));
            }
            b'#' if i > 0 && b[i - 1] == b' ' => return None,
            _ => {}
        }
    }
    None
}

/// A value written after its key or entry marker, alone up to the end of the line.
fn inline(text: &str) -> Option<Node<'_>> {
    let (node, after) = match text.as_bytes().first()? {
        b'[' | b'{' => flow(text, 0)?,
        b'"' | b'\'' => {
            let (s, after) = quoted(text)?;
            (Node::Scalar(s), after)
        }
        _ => {
            if bad_start(text) {
                return None;
            }
            let end = text.find(" #").unwrap_or(text.len());
            let s = text[..end].trim_end_matches(' ');
            if s.contains(": ") || s.ends_with(':') {
                return None; // a mapping where a scalar must be: an error in YAML
            }
            (Node::Scalar(Scalar::plain(s)), &text[end..])
        }
    };
    is_end(after).then_some(node)
}

/// A flow sequence or mapping at the start of `text` (on this line); returns it and the
/// text after it.
fn flow(text: &str, depth: usize) -> Option<(Node<'_>, &str)> {
    if depth > MAX_DEPTH {
        return None;
    }
    let close = if text.starts_with('[') { ']' } else { '}' };
    let mut rest = text.get(1..)?.trim_start_matches(' ');
    let mut items = Vec::new();
    let mut entries = Vec::new();
    if let Some(r) = rest.strip_prefix(close) {
        let node = if close == ']' {
            Node::Seq(items)
        } else {
            Node::Map(entries)
        };
        return Some((node, r));
    }
    loop {
        if close == ']' {
            let (item, r) = flow_item(rest, depth)?;
            if r.starts_with(':') {
                return None; // a single-pair mapping inside a sequence
            }
            items.push(item);
            rest = r;
        } else {
            let (key, r) = match flow_item(rest, depth)? {
                (Node::Scalar(k), r) => (k, r),
                _ => return None,
            };
            let r = r.strip_prefix(':')?;
            if key.plain && !r.starts_with(' ') {
                return None;
            }
            let r = r.trim_start_matches(' ');
            let (value, r) = if r.starts_with([',', '}']) {
                (Node::Scalar(Scalar::empty()), r)
            } else {
                flow_item(r, depth)?
            };
            if entries
                .iter()
                .any(|(k, _): &(Scalar, Node)| k.text == key.text)
            {
                return None;
            }
            entries.push((key, value));
            rest = r;
        }
        rest = rest.trim_start_matches(' ');
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start_matches(' ');
            if rest.starts_with(close) {
                return None; // a trailing comma
            }
        } else if let Some(r) = rest.strip_prefix(close) {
            let node = if close == ']' {
                Node::Seq(items)
            } else {
                Node::Map(entries)
            };
            return Some((node, r));
        } else {
            return None;
        }
    }
}

/// One item of a flow collection: a nested collection, a quoted or a plain scalar.
fn flow_item(text: &str, depth: usize) -> Option<(Node<'_>, &str)> {
    match text.as_bytes().first()? {
        b'[' | b'{' => flow(text, depth + 1),
        b'"' | b'\'' => {
            let (s, r) = quoted(text)?;
            Some((Node::Scalar(s), r.trim_start_matches(' ')))
        }
        _ => {
            if bad_start(text) {
                return None;
            }
            let b = text.as_bytes();
            let mut end = b.len();
            for (i, &c) in b.iter().enumerate() {
                let stop = matches!(c, b',' | b'[' | b']' | b'{' | b'}')
                    || (c == b':' && b.get(i + 1).is_none_or(|&n| n == b' ' || n == b','))
                    || (c == b'#' && i > 0 && b[i - 1] == b' ');
                if stop {
                    end = i;
                    break;
                }
            }
            let s = text[..end].trim_end_matches(' ');
            (!s.is_empty()).then_some((Node::Scalar(Scalar::plain(s)), &text[end..]))
        }
    }
}

/// A single- or double-quoted scalar at the start of `text`, ending on this line; returns
/// it and the text after the closing quote.
fn quoted(text: &str) -> Option<(Scalar<'_>, &str)> {
    let q = *text.as_bytes().first()?;
    let body = &text[1..];
    if q == b'\'' {
        let mut out: Option<String> = None;
        let mut from = 0;
        let b = body.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\'' {
                if b.get(i + 1) == Some(&b'\'') {
                    out.get_or_insert_with(String::new)
                        .push_str(&body[from..=i]);
                    i += 2;
                    from = i;
                    continue;
                }
                let text = match out {
                    Some(mut s) => {
                        s.push_str(&body[from..i]);
                        Cow::Owned(s)
                    }
                    None => Cow::Borrowed(&body[..i]),
                };
                return Some((Scalar { text, plain: false }, &body[i + 1..]));
            }
            i += 1;
        }
        return None;
    }
    let mut out: Option<String> = None;
    let mut from = 0;
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                let text = match out {
                    Some(mut s) => {
                        s.push_str(&body[from..i]);
                        Cow::Owned(s)
                    }
                    None => Cow::Borrowed(&body[..i]),
                };
                return Some((Scalar { text, plain: false }, &body[i + 1..]));
            }
            '\\' => {
                let s = out.get_or_insert_with(String::new);
                s.push_str(&body[from..i]);
                let (_, e) = chars.next()?;
                let hex = |chars: &mut std::str::CharIndices, n: usize| {
                    let mut v = 0u32;
                    for _ in 0..n {
                        v = v * 16 + chars.next()?.1.to_digit(16)?;
                    }
                    char::from_u32(v)
                };
                let ch = match e {
                    '0' => '\0',
                    'a' => '\x07',
                    'b' => '\x08',
                    't' | '\t' => '\t',
                    'n' => '\n',
                    'v' => '\x0b',
                    'f' => '\x0c',
                    'r' => '\r',
                    'e' => '\x1b',
                    ' ' => ' ',
                    '"' => '"',
                    '/' => '/',
                    '\\' => '\\',
                    'x' => hex(&mut chars, 2)?,
                    'u' => hex(&mut chars, 4)?,
                    'U' => hex(&mut chars, 8)?,
                    _ => return None, // \N, \_, \L, \P and the unknown: left to serde_yaml
                };
                s.push(ch);
                from = chars.offset();
            }
            _ => {}
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Deserializing

/// Why a node does not fit: never shown (the caller parses the document again with
/// serde_yaml, whose message is the one reported).
#[derive(Debug)]
pub struct Mismatch(String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Mismatch {}

impl de::Error for Mismatch {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Mismatch(msg.to_string())
    }
}

fn mismatch<T>(what: &str) -> Result<T, Mismatch> {
    Err(Mismatch(what.to_string()))
}

/// Which of serde_yaml's two ways of reading to follow.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `serde_yaml::from_str`: straight from the events, a string takes any scalar.
    Document,
    /// `serde_yaml::from_value`: every scalar typed first (null, bool, number, string).
    Value,
}

/// A node to deserialize, and how.
#[derive(Clone, Copy)]
struct De<'de> {
    node: &'de Node<'de>,
    mode: Mode,
}

impl<'de> De<'de> {
    fn new(node: &'de Node<'de>, mode: Mode) -> Self {
        De { node, mode }
    }

    fn items(self, items: &'de [Node<'de>]) -> Items<'de> {
        Items {
            iter: items.iter(),
            mode: self.mode,
        }
    }

    fn entries(self, entries: &'de [(Scalar<'de>, Node<'de>)]) -> Entries<'de> {
        Entries {
            iter: entries.iter(),
            value: None,
            mode: self.mode,
        }
    }

    /// A null where a collection is expected reads as an empty one: in a document only
    /// the empty scalar, as a value any null.
    fn empty(self) -> bool {
        match self.node {
            Node::Scalar(s) => match self.mode {
                Mode::Document => s.plain && s.text.is_empty(),
                Mode::Value => s.is_null(),
            },
            _ => false,
        }
    }
}

impl<'de> Scalar<'de> {
    fn visit_str<V: Visitor<'de>>(&'de self, v: V) -> Result<V::Value, Mismatch> {
        match &self.text {
            Cow::Borrowed(s) => v.visit_borrowed_str(s),
            Cow::Owned(s) => v.visit_str(s),
        }
    }

    /// A string field's value: any scalar in a document, only a string as a value.
    fn visit_string<V: Visitor<'de>>(&'de self, mode: Mode, v: V) -> Result<V::Value, Mismatch> {
        if mode == Mode::Value && !self.is_string() {
            return mismatch("a typed scalar where a string is expected");
        }
        self.visit_str(v)
    }

    fn visit_int<V: Visitor<'de>>(&self, v: V) -> Result<V::Value, Mismatch> {
        match self.as_int() {
            Some(Int::Pos(n)) => v.visit_u64(n),
            Some(Int::Neg(n)) => v.visit_i64(n),
            None => mismatch("not a decimal integer"),
        }
    }

    /// A scalar whose type is not known: resolved as serde_yaml resolves it, except the
    /// numbers other than decimal integers, which are left to serde_yaml.
    fn visit_any<V: Visitor<'de>>(&'de self, v: V) -> Result<V::Value, Mismatch> {
        if !self.plain {
            self.visit_str(v)
        } else if self.is_null() {
            v.visit_unit()
        } else if let Some(b) = self.as_bool() {
            v.visit_bool(b)
        } else if self.as_int().is_some() {
            self.visit_int(v)
        } else if self.is_number() {
            mismatch("a number serde_yaml would read")
        } else {
            self.visit_str(v)
        }
    }
}

macro_rules! ints {
    ($($f:ident)*) => {$(
        fn $f<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
            match self.node {
                Node::Scalar(s) => s.visit_int(v),
                _ => mismatch("an integer expected"),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for De<'de> {
    type Error = Mismatch;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        match self.node {
            Node::Scalar(s) => s.visit_any(v),
            Node::Seq(items) => v.visit_seq(self.items(items)),
            Node::Map(entries) => v.visit_map(self.entries(entries)),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        match self.node {
            Node::Scalar(s) => match s.as_bool() {
                Some(b) => v.visit_bool(b),
                None => mismatch("not a boolean"),
            },
            _ => mismatch("a boolean expected"),
        }
    }

    ints!(deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
          deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64);

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        match self.node {
            Node::Scalar(s) => s.visit_string(self.mode, v),
            _ => mismatch("a string expected"),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        self.deserialize_str(v)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        match self.node {
            Node::Scalar(s) if s.is_null() => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        match self.node {
            Node::Scalar(s) if s.is_null() => v.visit_unit(),
            _ => mismatch("null expected"),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, Mismatch> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        match self.node {
            Node::Seq(items) => v.visit_seq(self.items(items)),
            _ if self.empty() => v.visit_seq(self.items(&[])),
            _ => mismatch("a sequence expected"),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        match self.node {
            Node::Map(entries) => v.visit_map(self.entries(entries)),
            _ if self.empty() => v.visit_map(self.entries(&[])),
            _ => mismatch("a mapping expected"),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Mismatch> {
        self.deserialize_map(v)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        v.visit_unit()
    }

    // Floats, characters, bytes, tuples, unit structs and enums, rare in Kubernetes
    // objects, take the node as it is: a float field gets a decimal integer (as from
    // serde_yaml), and what serde_yaml would read otherwise (`1.5`, `.inf`) is a number
    // this reader declines, so the caller asks serde_yaml.
    serde::forward_to_deserialize_any! {
        f32 f64 char bytes byte_buf unit_struct tuple tuple_struct enum
    }
}

struct Items<'de> {
    iter: std::slice::Iter<'de, Node<'de>>,
    mode: Mode,
}

impl<'de> SeqAccess<'de> for Items<'de> {
    type Error = Mismatch;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Mismatch> {
        let mode = self.mode;
        self.iter
            .next()
            .map(|n| seed.deserialize(De::new(n, mode)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct Entries<'de> {
    iter: std::slice::Iter<'de, (Scalar<'de>, Node<'de>)>,
    value: Option<&'de Node<'de>>,
    mode: Mode,
}

impl<'de> MapAccess<'de> for Entries<'de> {
    type Error = Mismatch;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Mismatch> {
        let Some((k, v)) = self.iter.next() else {
            return Ok(None);
        };
        self.value = Some(v);
        seed.deserialize(KeyDe(k, self.mode)).map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Mismatch> {
        match self.value.take() {
            Some(v) => seed.deserialize(De::new(v, self.mode)),
            None => mismatch("a value without a key"),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// A mapping key: a scalar, read as a string; a key serde_yaml would type otherwise
/// (`80:`, `true:`) is left to it.
struct KeyDe<'de>(&'de Scalar<'de>, Mode);

impl<'de> Deserializer<'de> for KeyDe<'de> {
    type Error = Mismatch;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        if !self.0.is_string() {
            return mismatch("a key serde_yaml would type");
        }
        self.0.visit_str(v)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        self.0.visit_string(self.1, v)
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        self.0.visit_string(self.1, v)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Mismatch> {
        self.0.visit_string(self.1, v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map struct enum ignored_any
    }
}
