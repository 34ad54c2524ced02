#![allow(clippy::unwrap_used)]

//! The modules' dependencies run one way: a module uses only modules below
//! it, and an engine never reaches into another engine. Read from the
//! source, so a new upward `use` fails here rather than in review.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Modules from the bottom up; each may use only those of a lower rank.
const LAYERS: &[(&str, u8)] = &[
    ("base64", 0),
    ("names", 0),
    ("redact", 0),
    ("usage", 0),
    ("config", 1),
    ("audio", 2),
    ("knowledge", 2),
    ("ledger", 2),
    ("tools", 3),
    ("tts", 3),
    ("engine", 4),
    ("telemetry", 5),
    ("session", 6),
    ("server", 7),
    ("cli", 8),
];

/// The engines, by their directory or file under `src/engine/`.
const ENGINES: &[&str] = &[
    "gemini_live",
    "local",
    "nova_sonic",
    "openai_realtime",
    "scripted",
];

fn rank(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|&(_, r)| r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::a::b` path in `text`, as its segments, brace lists
/// (`crate::{a, b::c}`) expanded one level.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().last();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | ':' | '$')) {
            continue; // `$crate::`, `other_crate::`
        }
        if let Some(list) = rest.strip_prefix('{') {
            let end = list.find('}').unwrap_or(list.len());
            for item in list[..end].split(',') {
                out.push(segments(item.trim()));
            }
        } else {
            out.push(segments(rest));
        }
    }
    out.retain(|p| !p.is_empty());
    out
}

fn segments(text: &str) -> Vec<String> {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    text[..end]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn dependencies_run_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "found only {} files", files.len());
    let mut wrong = BTreeSet::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap_or(file);
        let parts: Vec<String> = relative
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
            .collect();
        let module = parts[0].as_str();
        if matches!(module, "lib" | "main") {
            continue;
        }
        let Some(own) = rank(module) else {
            wrong.insert(format!(
                "{}: module {module} has no layer",
                relative.display()
            ));
            continue;
        };
        let own_engine = (module == "engine" && parts.len() > 1)
            .then(|| parts[1].as_str())
            .filter(|e| ENGINES.contains(e));
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for path in crate_paths(&text) {
            let used = path[0].as_str();
            let shown = format!("{}: crate::{}", relative.display(), path.join("::"));
            match rank(used) {
                None => drop(wrong.insert(format!("{shown} (unknown module)"))),
                Some(r) if used != module && r >= own => {
                    wrong.insert(format!("{shown} (layer {r} from layer {own})"));
                }
                _ => {}
            }
            // Only the command line picks engines by name; the rest speak to
            // any engine through the trait, and no engine reaches into another.
            let engine = (used == "engine")
                .then(|| path.get(1).map(String::as_str))
                .flatten()
                .filter(|e| ENGINES.contains(e));
            if let Some(engine) = engine {
                // The scripted engine is a fixture: unit tests may drive
                // other parts with it.
                let fixture = engine == "scripted" && parts.last().is_some_and(|p| p == "tests");
                let allowed = module == "cli"
                    || own_engine == Some(engine)
                    || fixture
                    || parts.last().is_some_and(|p| p == "fuzzing");
                if !allowed {
                    wrong.insert(format!("{shown} (another engine's internals)"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "upward or sideways uses:\n{}", {
        let list: Vec<String> = wrong.into_iter().collect();
        list.join("\n")
    });
}

#[test]
fn the_reader_finds_paths_in_use_lists_and_code() {
    let text = "use crate::{server, tools::Tools};\n// crate::cli in a comment\n\
                let x = crate::audio::ENGINE_RATE_HZ; $crate::y; other_crate::z;";
    assert_eq!(
        crate_paths(text),
        [
            vec!["server".to_owned()],
            vec!["tools".to_owned(), "Tools".to_owned()],
            vec!["audio".to_owned(), "ENGINE_RATE_HZ".to_owned()],
        ]
    );
}
