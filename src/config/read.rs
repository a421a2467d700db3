//! Reading TOML text into a [`Config`] while collecting every type error, not only the
//! first.
//!
//! serde stops at the first error, so the text is parsed to a [`toml::Table`] and
//! deserialized into [`Config`] again and again: each failure is recorded with its TOML
//! path (in the file's array indices) and line, the value at that path is removed (a
//! field, or a whole array element when the element itself cannot be built, e.g. a
//! required field is missing), and the rest is tried again. The serde structs stay the
//! single source of truth: nothing here knows a section or a field by name, except
//! [`Removed::is_consequence`], which knows that endpoints name providers.

use std::collections::HashMap;

use toml::de::{DeTable, DeValue};

use super::{Config, Problem};

/// At most this many type errors are collected; past it the rest of the file is not
/// read (a file this broken is not one to check field by field).
const MAX_TYPE_ERRORS: usize = 200;

/// One step of a TOML path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Seg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// `providers[1].timeout_secs`, as serde_path_to_error writes paths.
fn format_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The inverse of [`format_path`] for the paths the semantic checks write (keys with a
/// `.` or a `[` in them are split wrongly, and then simply not translated).
fn parse_path(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for piece in path.split('.') {
        let (name, mut rest) = match piece.find('[') {
            Some(at) => piece.split_at(at),
            None => (piece, ""),
        };
        out.push(Seg::Key(name.to_string()));
        while let Some(index) = rest
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .and_then(|(n, r)| Some((n.parse().ok()?, r)))
        {
            out.push(Seg::Index(index.0));
            rest = index.1;
        }
        if !rest.is_empty() {
            // Not a path this module wrote: keep it as it is.
            return vec![Seg::Key(path.to_string())];
        }
    }
    out
}

/// What was taken out of the file to let the rest deserialize.
#[derive(Debug, Default)]
pub(super) struct Removed {
    /// Original path of an array → the original indices of the elements still in it
    /// (absent: nothing was removed from that array).
    kept: HashMap<Vec<Seg>, Vec<usize>>,
    /// Original paths of the removed values, with the values.
    values: Vec<(Vec<Seg>, toml::Value)>,
}

impl Removed {
    /// The file's path for a path into the pruned value.
    fn original(&self, path: &[Seg]) -> Vec<Seg> {
        let mut out = Vec::with_capacity(path.len());
        for seg in path {
            let seg = match seg {
                Seg::Index(i) => Seg::Index(
                    self.kept
                        .get(&out)
                        .and_then(|kept| kept.get(*i).copied())
                        .unwrap_or(*i),
                ),
                key => key.clone(),
            };
            out.push(seg);
        }
        out
    }

    /// A semantic problem's path (written against the pruned config) in the file's
    /// indices.
    pub(super) fn translate(&self, path: &str) -> String {
        if self.kept.is_empty() || path.is_empty() {
            return path.to_string();
        }
        format_path(&self.original(&parse_path(path)))
    }

    /// Whether a semantic problem of the pruned `config` only follows from something
    /// that was removed (already reported as a type error), and so must not be
    /// reported: it is about a removed value (judged as its default), it is an array
    /// left short or empty by a removal, or it is an endpoint naming a provider that
    /// failed to parse (or whose `[[providers]]` could not be read at all).
    pub(super) fn is_consequence(&self, config: &Config, problem: &Problem) -> bool {
        if self.values.is_empty() {
            return false;
        }
        let path = self.original(&parse_path(&problem.path));
        if self
            .values
            .iter()
            .any(|(removed, _)| removed.starts_with(&path) || path.starts_with(removed))
        {
            return true;
        }
        // `models[i].endpoints[j].provider` (pruned indices) naming a provider that was
        // removed.
        let pruned = parse_path(&problem.path);
        let [Seg::Key(models), Seg::Index(i), Seg::Key(endpoints), Seg::Index(j), Seg::Key(field)] =
            pruned.as_slice()
        else {
            return false;
        };
        if (models.as_str(), endpoints.as_str(), field.as_str())
            != ("models", "endpoints", "provider")
        {
            return false;
        }
        let Some(name) = config
            .models
            .get(*i)
            .and_then(|m| m.endpoints.get(*j))
            .map(|e| e.provider.as_str())
        else {
            return false;
        };
        if config.providers.iter().any(|p| p.name == name) {
            return false;
        }
        self.values
            .iter()
            .any(|(removed, value)| match removed.as_slice() {
                [Seg::Key(k)] => k == "providers",
                [Seg::Key(k), Seg::Index(_)] => {
                    k == "providers" && value.get("name").and_then(|n| n.as_str()) == Some(name)
                }
                _ => false,
            })
    }

    /// Takes the value at `path` (pruned indices) out of `root`, remembering it; false
    /// when there is nothing there to take.
    fn take(&mut self, root: &mut toml::Table, path: &[Seg]) -> bool {
        let Some((last, parent)) = path.split_last() else {
            return false;
        };
        let Some(parent_value) = walk_mut(root, parent) else {
            return false;
        };
        let original_parent = self.original(parent);
        let original = self.original(path);
        let taken = match (parent_value, last) {
            (Container::Table(t), Seg::Key(k)) => t.remove(k),
            (Container::Array(a), Seg::Index(i)) if *i < a.len() => {
                let kept = self
                    .kept
                    .entry(original_parent.clone())
                    .or_insert_with(|| (0..a.len()).collect());
                kept.remove(*i);
                Some(a.remove(*i))
            }
            _ => None,
        };
        match taken {
            Some(value) => {
                self.values.push((original, value));
                true
            }
            None => false,
        }
    }

    /// Whether `path` (original indices) was removed.
    fn was_removed(&self, path: &[Seg]) -> bool {
        self.values.iter().any(|(p, _)| p == path)
    }
}

enum Container<'a> {
    Table(&'a mut toml::Table),
    Array(&'a mut Vec<toml::Value>),
}

/// The table or array at `path` inside `root`.
fn walk_mut<'a>(root: &'a mut toml::Table, path: &[Seg]) -> Option<Container<'a>> {
    let mut here = Container::Table(root);
    for seg in path {
        let next = match (here, seg) {
            (Container::Table(t), Seg::Key(k)) => t.get_mut(k)?,
            (Container::Array(a), Seg::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
        here = match next {
            toml::Value::Table(t) => Container::Table(t),
            toml::Value::Array(a) => Container::Array(a),
            _ => return None,
        };
    }
    Some(here)
}

/// The 1-based line where `path` (original indices) is written: its key, or the
/// nearest enclosing table or element that is.
fn line_of(text: &str, doc: &DeTable<'_>, path: &[Seg]) -> Option<usize> {
    let mut start = None;
    let mut value: Option<&DeValue<'_>> = None;
    let mut table = Some(doc);
    for seg in path {
        let next = match (table, value, seg) {
            (Some(t), _, Seg::Key(k)) => t
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                .map(|(key, v)| (key.span().start, v)),
            (None, Some(DeValue::Array(a)), Seg::Index(i)) => {
                a.get(*i).map(|v| (v.span().start, v))
            }
            _ => None,
        };
        let Some((at, v)) = next else { break };
        start = Some(at);
        value = Some(v.get_ref());
        table = v.get_ref().as_table();
    }
    let start = start?;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// serde's words for what it expected, in the words of a TOML file.
fn plain_words(message: &str) -> String {
    let mut out = message.to_string();
    for (serde, plain) in [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
    ] {
        if let Some(rest) = out.strip_suffix(serde) {
            out = format!("{rest}{plain}");
        }
    }
    if let Some(struct_name) = out
        .rsplit_once("expected struct ")
        .map(|(_, s)| s.to_string())
    {
        out = out.replace(
            &format!("expected struct {struct_name}"),
            "expected a table",
        );
    }
    if out.starts_with("missing field") {
        out.push_str(": add it");
    }
    out
}

/// The problems sorted by line (serde meets a table's fields in key order), each
/// message ending with its line.
fn in_file_order(mut problems: Vec<(Option<usize>, Problem)>) -> Vec<Problem> {
    problems.sort_by_key(|(line, _)| line.unwrap_or(usize::MAX));
    problems
        .into_iter()
        .map(|(line, mut p)| {
            if let Some(line) = line {
                p.message = format!("{} (line {line})", p.message);
            }
            p
        })
        .collect()
}

/// Parses `text`: the config built from every part that deserializes (`None` when
/// nothing could be), the type errors found on the way, and what was removed.
///
/// `Err` is a syntax error: not TOML at all, one problem.
pub(super) fn read(text: &str) -> Result<(Option<Config>, Vec<Problem>, Removed), Problem> {
    let syntax = |e: toml::de::Error| Problem {
        path: String::new(),
        message: format!("not valid TOML: {}", e.to_string().trim()),
    };
    let doc = DeTable::parse(text).map_err(syntax)?;
    let mut root: toml::Table = toml::from_str(text).map_err(syntax)?;
    let mut removed = Removed::default();
    let mut problems = Vec::new();
    loop {
        let err =
            match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(root.clone())) {
                Ok(config) => return Ok((Some(config), in_file_order(problems), removed)),
                Err(e) => e,
            };
        let mut path = Vec::new();
        for seg in err.path().iter() {
            match seg {
                serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
                // Not a place in the file (an enum variant, or unknown): the error
                // belongs to what encloses it.
                _ => break,
            }
        }
        let original = removed.original(&path);
        let message = err.into_inner().message().to_string();
        // A required field removed for its bad value now "is missing": that is the
        // same problem, already reported.
        let echo = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split_once('`'))
            .is_some_and(|(field, _)| {
                let mut field_path = original.clone();
                field_path.push(Seg::Key(field.to_string()));
                removed.was_removed(&field_path)
            });
        if !echo {
            let line = line_of(text, doc.get_ref(), &original);
            problems.push((
                line,
                Problem {
                    path: format_path(&original),
                    message: plain_words(&message),
                },
            ));
        }
        if problems.len() >= MAX_TYPE_ERRORS || !removed.take(&mut root, &path) {
            return Ok((None, in_file_order(problems), removed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for p in [
            "server.listen",
            "models[1].endpoints[0].provider",
            "keys[0].models[2]",
            "providers[0].headers.x-y",
        ] {
            assert_eq!(format_path(&parse_path(p)), p);
        }
    }

    #[test]
    fn lines_are_those_of_the_keys() {
        let text = "[server]\nlisten = 1\n\n[[providers]]\nname = \"a\"\n[[providers]]\nkind = 2\n";
        let doc = DeTable::parse(text).unwrap();
        let at = |p: &str| line_of(text, doc.get_ref(), &parse_path(p));
        assert_eq!(at("server.listen"), Some(2));
        assert_eq!(at("providers[1].kind"), Some(7));
        assert_eq!(at("providers[0].name"), Some(5));
        // Missing: the nearest enclosing thing that is written.
        assert_eq!(at("server.nothing"), Some(1));
    }
}
