//! The config reference (`docs/config.md`), generated from the config types: their JSON
//! schema (schemars reads the serde attributes, the defaults and the doc comments), walked into
//! one row per key. `quicmesh config reference` prints it; a test keeps the file equal to it.
//!
//! Two columns come from conventions rather than types: who may set a key follows from its
//! section, and a key (or a table around it) whose doc comment says "Read at start" takes
//! effect at the next start, where every other key applies when its file changes.

use std::borrow::Cow;
use std::fmt::Write as _;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::Value;

use super::Config;

/// How durations are written in config files (`"500ms"`, `"10s"`, `"1h"`): the schema of the
/// fields serde reads with `humantime_serde`.
pub struct Duration;

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "format": "duration" })
    }
}

/// The whole reference, in Markdown.
pub fn markdown() -> String {
    let schema = schemars::schema_for!(Config);
    let root = schema.as_value();
    let mut walker = Walker { root, rows: Vec::new(), seen: std::collections::HashMap::new() };
    walker.walk(root, "", false, false, 0);
    let rows = walker.rows;
    let mut out = String::from(HEADER);
    let mut section = "";
    for row in &rows {
        let top = row.key.split(['.', '[']).next().unwrap_or_default();
        if top != section {
            section = top;
            let _ = write!(out, "\n## `{top}`\n\n{}\n\n", section_note(top));
            out.push_str("| key | type | default | applies | description |\n|---|---|---|---|---|\n");
        }
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            row.key,
            row.kind,
            row.default,
            row.applies(),
            cell(&row.description)
        );
    }
    out
}

const HEADER: &str = "# Configuration reference

Every key quicmesh reads, generated from the config types by `quicmesh config reference`
(`tests/deploy.rs` fails when this file and the code disagree; regenerate it with
`cargo run -- config reference > docs/config.md`). Files are TOML, layered in the order of
`--config`; `QUICMESH_SECTION__KEY` environment variables override them (`QUICMESH_NODE__ADMIN`
for `node.admin`). Durations are written `\"500ms\"`, `\"10s\"`, `\"1h\"`; the request, connect,
drain, keep-alive, idle, grace, watch, health-check, ejection, route, external-authorization and
key-set times are at most 10 years. Keys under `[]` belong
to each element of an array of tables (`[[services]]`, `[[gateway.routes]]`).

*Applies*: *on change* keys take effect when the file that sets them changes, on the gateway
(which watches its files and overlays) and on the nodes joined to it (which get the mesh-wide
sections in its snapshots, and re-read their own `node.instances`); a change that fails
validation is refused and logged, and the running config stays. *At start* keys need a
restart; a reload that changes one is applied to nothing else and says so in the log. A static
node (no control plane) reads every key at start.
";

/// Who may set the keys of a top-level section, and where they take effect.
fn section_note(top: &str) -> &'static str {
    match top {
        "node" => "Set by the node's own files and environment; a gateway never pushes them.",
        "gateway" => "Set by the gateway's own files and environment.",
        "services" => {
            "Mesh-wide: set in the files of the gateway (and in its per-service overlays, \
             `<gateway.overlays>/services/<name>.toml`), which pushes them to every joined node; \
             a static node reads its own files."
        }
        "timeouts" => {
            "Mesh-wide: set in the files of the gateway (and per node in its per-node overlays, \
             `<gateway.overlays>/nodes/<name>.toml`), which pushes them to joined nodes; a static \
             node reads its own files."
        }
        "nodes" | "routes" | "grpc_routes" | "authorization" | "revoked" => {
            "Mesh-wide: set in the files of the gateway, which pushes them to every joined node \
             in its snapshots; a static node reads its own files."
        }
        _ => "Read by each member from its own files and environment (the same file on every host, usually).",
    }
}

struct Row {
    key: String,
    kind: String,
    default: String,
    at_start: bool,
    description: String,
}

impl Row {
    fn applies(&self) -> &'static str {
        if self.description.contains("a reload that changes it is refused") {
            "at start (a reload changing it is refused)"
        } else if self.at_start {
            "at start"
        } else {
            "on change"
        }
    }
}

/// Resolves `$ref` (keeping the referring schema's description and default) and a nullable
/// `anyOf [X, null]` (an `Option`) to the schema that says what the key holds.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> (Cow<'a, Value>, bool) {
    let mut optional = false;
    let mut s = Cow::Borrowed(schema);
    for _ in 0..8 {
        if let Some(target) = s.get("$ref").and_then(Value::as_str) {
            let name = target.trim_start_matches("#/$defs/");
            let Some(def) = root.get("$defs").and_then(|d| d.get(name)) else { break };
            let mut merged = def.clone();
            for key in ["description", "default"] {
                if let Some(v) = s.get(key) {
                    merged[key] = v.clone();
                }
            }
            s = Cow::Owned(merged);
            continue;
        }
        if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
            let some: Vec<&Value> = any.iter().filter(|v| v.get("type") != Some(&Value::from("null"))).collect();
            if some.len() == 1 && any.len() == 2 {
                optional = true;
                let mut inner = some[0].clone();
                for key in ["description", "default"] {
                    if let Some(v) = s.get(key) {
                        inner[key] = v.clone();
                    }
                }
                s = Cow::Owned(inner);
                continue;
            }
        }
        break;
    }
    (s, optional)
}

/// Walks the schema into rows. A type met a second time (routes are the same shape at the edge
/// and in the mesh) gets one row pointing at its first place instead of all its keys again.
struct Walker<'a> {
    root: &'a Value,
    rows: Vec<Row>,
    /// Definitions already written out, and where.
    seen: std::collections::HashMap<String, String>,
}

impl Walker<'_> {
    fn walk(&mut self, schema: &Value, key: &str, at_start: bool, required: bool, depth: usize) {
        let root = self.root;
        let (s, optional) = resolve(root, schema);
        let description = s.get("description").and_then(Value::as_str).unwrap_or_default().replace('\n', " ");
        let at_start =
            (at_start || description.contains("Read at start")) && !description.contains("Applies on change");
        let default = match s.get("default") {
            Some(Value::Null) | None if optional => "unset".to_string(),
            None if required => "required".to_string(),
            None => "-".to_string(),
            Some(v) => show(v),
        };
        let row = |rows: &mut Vec<Row>, kind: String| {
            if !key.is_empty() {
                rows.push(Row {
                    key: key.to_string(),
                    kind,
                    default: default.clone(),
                    at_start,
                    description: description.clone(),
                });
            }
        };
        // A named type with keys of its own, already written out elsewhere.
        if let Some(name) = def_name(schema) {
            let (def, _) = resolve(root, schema);
            if def.get("properties").is_some() || def.get("oneOf").is_some_and(|_| tag_of_first(root, &def)) {
                if let Some(first) = self.seen.get(&name) {
                    return row(&mut self.rows, format!("table, as `{first}`"));
                }
                self.seen.insert(name, key.to_string());
            }
        }
        if depth > 16 {
            return row(&mut self.rows, "table".into());
        }
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            row(&mut self.rows, "table".into());
            let needed: Vec<&str> =
                s.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
            let mut names: Vec<&String> = props.keys().collect();
            names.sort();
            for name in names {
                self.walk(&props[name], &join(key, name), at_start, needed.contains(&name.as_str()), depth + 1);
            }
            return;
        }
        if let Some(variants) = s.get("oneOf").and_then(Value::as_array) {
            let tags: Vec<String> = variants.iter().filter_map(|v| tag(root, v)).collect();
            if tags.len() == variants.len() && variants.iter().all(|v| resolve(root, v).0.get("properties").is_some()) {
                // A tagged enum (a filter, say): one row for the tag, then each variant's keys.
                let kinds = tags.iter().map(|t| format!("`type = \"{t}\"`")).collect::<Vec<_>>().join(", ");
                row(&mut self.rows, format!("table, one of {kinds}"));
                for v in variants {
                    let (v, _) = resolve(root, v);
                    if let Some(props) = v.get("properties").and_then(Value::as_object) {
                        for (name, p) in props.iter().filter(|(n, _)| n.as_str() != "type") {
                            self.walk(p, &join(key, name), at_start, true, depth + 1);
                        }
                    }
                }
                return;
            }
            return row(&mut self.rows, one_of(root, variants));
        }
        match s.get("type") {
            Some(Value::String(t)) if t == "array" => {
                let items = s.get("items").cloned().unwrap_or(Value::Null);
                let (item, _) = resolve(root, &items);
                if item.get("properties").is_some() || tag_of_first(root, &item) {
                    row(&mut self.rows, "array of tables".into());
                    self.walk(&items, &format!("{key}[]"), at_start, false, depth + 1);
                } else {
                    row(&mut self.rows, format!("array of {}", kind(root, &item)));
                }
            }
            _ => row(&mut self.rows, kind(root, &s)),
        }
    }
}

/// The name of the definition a schema refers to (through an `Option`, too).
fn def_name(schema: &Value) -> Option<String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return Some(r.trim_start_matches("#/$defs/").to_string());
    }
    let any = schema.get("anyOf")?.as_array()?;
    any.iter().find_map(def_name)
}

fn tag_of_first(root: &Value, s: &Value) -> bool {
    s.get("oneOf").and_then(Value::as_array).and_then(|v| v.first()).and_then(|v| tag(root, v)).is_some()
}

/// The `type = "..."` tag of one variant of a tagged enum.
fn tag(root: &Value, variant: &Value) -> Option<String> {
    let (v, _) = resolve(root, variant);
    v.get("properties")?.get("type")?.get("const")?.as_str().map(str::to_string)
}

/// What a scalar (or a map, or an enum of strings) holds, in a few words.
fn kind(root: &Value, s: &Value) -> String {
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        return values.iter().map(|v| format!("`{}`", show_raw(v))).collect::<Vec<_>>().join(" \\| ");
    }
    if let Some(c) = s.get("const") {
        return format!("`{}`", show_raw(c));
    }
    if let Some(variants) = s.get("oneOf").and_then(Value::as_array) {
        return one_of(root, variants);
    }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect(),
        _ => vec![],
    };
    let format = s.get("format").and_then(Value::as_str);
    match (types.first().copied(), format) {
        (Some("string"), Some("duration")) => "duration".into(),
        (Some("string"), _) => "string".into(),
        (Some("integer"), _) => "integer".into(),
        (Some("number"), _) => "number".into(),
        (Some("boolean"), _) => "boolean".into(),
        (Some("array"), _) => {
            let items = s.get("items").cloned().unwrap_or(Value::Null);
            format!("array of {}", kind(root, &resolve(root, &items).0))
        }
        (Some("object"), _) => {
            let values = s.get("additionalProperties").cloned().unwrap_or(Value::Null);
            format!("table of {}", kind(root, &resolve(root, &values).0))
        }
        _ => "value".into(),
    }
}

fn one_of(root: &Value, variants: &[Value]) -> String {
    variants.iter().map(|v| kind(root, &resolve(root, v).0)).collect::<Vec<_>>().join(" \\| ")
}

fn join(key: &str, name: &str) -> String {
    if key.is_empty() {
        name.to_string()
    } else {
        format!("{key}.{name}")
    }
}

/// A default as it would be written in TOML, short.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "unset".into(),
        Value::Array(a) if a.is_empty() => "none".into(),
        Value::Object(_) | Value::Array(_) => "-".into(),
        Value::String(s) if s.is_empty() => "`\"\"`".into(),
        _ => format!("`{}`", show_raw(v)),
    }
}

fn show_raw(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

/// The keys read at start whose value differs between `before` and `after` (as written in the
/// reference, array elements as `[]`): a reload applies everything else, and these wait for a
/// restart, which the caller says in its log.
pub fn changes_needing_restart(before: &Config, after: &Config) -> Vec<String> {
    let (Ok(before), Ok(after)) = (serde_json::to_value(before), serde_json::to_value(after)) else {
        return Vec::new();
    };
    let mut changed = Vec::new();
    diff(&before, &after, "", &mut changed);
    let keys = start_keys();
    let mut out: Vec<String> = changed
        .into_iter()
        .filter(|path| {
            // The most specific key of the reference that holds this path decides.
            keys.iter()
                .filter(|(key, _)| {
                    path == key || path.starts_with(&format!("{key}.")) || path.starts_with(&format!("{key}["))
                })
                .max_by_key(|(key, _)| key.len())
                .is_some_and(|(_, at_start)| *at_start)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every key of the reference, and whether it is read at start.
fn start_keys() -> &'static [(String, bool)] {
    static KEYS: std::sync::OnceLock<Vec<(String, bool)>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let schema = schemars::schema_for!(Config);
        let root = schema.as_value();
        let mut walker = Walker { root, rows: Vec::new(), seen: std::collections::HashMap::new() };
        walker.walk(root, "", false, false, 0);
        walker.rows.into_iter().map(|r| (r.key, r.at_start)).collect()
    })
}

/// The paths (reference form) where two serialized configs differ.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let (va, vb) = (x.get(key).unwrap_or(&Value::Null), y.get(key).unwrap_or(&Value::Null));
                diff(va, vb, &join(path, key), out);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (va, vb) in x.iter().zip(y) {
                diff(va, vb, &format!("{path}[]"), out);
            }
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}
