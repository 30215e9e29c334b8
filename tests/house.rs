//! The crate's shape, checked: what a reviewer would otherwise have to remember.
//!
//! - The product never imports the workshop (`src/lab/`): a change to the simulated switch,
//!   the benchmark or the test driver cannot change what the agent answers.
//! - Imports between the top-level modules point one way (no circle), so each can be read
//!   knowing only those below it.
//! - Every file under `src/` fits in a reader's mind (at most 900 lines), and every function
//!   outside unit tests on a screen or two (at most 120 lines).
//!
//! It reads the sources as text (`crate::<module>` paths, rustfmt's layout), which is what
//! a reviewer reads too. `cargo test --test house -- --nocapture` prints the module map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 900;
const MAX_FUNCTION_LINES: usize = 120;
/// The workshop: what drives the agent from outside.
const LAB: &str = "lab";

/// Every `.rs` file under `dir`, sorted.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found.sort();
    found
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to: `src/feed/writer.rs` → `feed`.
fn top_module(file: &Path) -> String {
    let relative = file.strip_prefix(src()).unwrap();
    let first = relative.components().next().unwrap();
    let name = first.as_os_str().to_str().unwrap();
    name.strip_suffix(".rs").unwrap_or(name).to_owned()
}

/// A file's text without its unit tests (`#[cfg(test)] mod tests`, which rustfmt keeps at
/// the end): tests may reach anywhere.
fn without_unit_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// The top-level modules named in `crate::` paths of `text`, `crate::{a, b::c}` included.
fn imports(text: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                found.extend(group.split(',').map(ident));
            }
            None => {
                found.insert(ident(rest));
            }
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// Each top-level module (and `lib`, the crate's root) with the others it imports.
fn module_map() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources(&src());
    let modules: BTreeSet<String> = files.iter().map(|f| top_module(f)).collect();
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = top_module(file);
        if module == "main" {
            continue; // the command line dispatches to everything, the lab's commands too
        }
        let text = std::fs::read_to_string(file).unwrap();
        let imported = imports(without_unit_tests(&text));
        let entry = map.entry(module.clone()).or_default();
        entry.extend(
            imported
                .into_iter()
                .filter(|m| *m != module && modules.contains(m)),
        );
    }
    map
}

#[test]
fn the_product_never_imports_the_lab_and_imports_point_one_way() {
    let map = module_map();
    for (module, imported) in &map {
        let list: Vec<&str> = imported.iter().map(String::as_str).collect();
        println!("{module:>10} → {}", list.join(", "));
    }
    assert!(map.contains_key(LAB), "no src/lab/: {map:?}");
    let into_lab: Vec<&String> = map
        .iter()
        .filter(|(module, imported)| *module != LAB && imported.contains(LAB))
        .map(|(module, _)| module)
        .collect();
    assert!(
        into_lab.is_empty(),
        "product modules import the lab: {into_lab:?}"
    );

    // A circle is a module that reaches itself.
    for start in map.keys().filter(|m| *m != "lib") {
        let mut seen = BTreeSet::new();
        let mut next: Vec<&String> = map[start].iter().collect();
        while let Some(module) = next.pop() {
            assert_ne!(module, start, "{start} reaches itself through its imports");
            if seen.insert(module) {
                next.extend(map.get(module).into_iter().flatten());
            }
        }
    }
}

#[test]
fn every_file_fits_a_reader_and_every_function_a_screen_or_two() {
    let mut long = Vec::new();
    for file in sources(&src()) {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(src()).unwrap().display().to_string();
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            long.push(format!("{name}: {lines} lines"));
        }
        for (function, length) in function_lengths(without_unit_tests(&text)) {
            if length > MAX_FUNCTION_LINES {
                long.push(format!("{name}: fn {function} is {length} lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_FILE_LINES} lines a file, {MAX_FUNCTION_LINES} a function:\n{}",
        long.join("\n")
    );
}

/// Each function of rustfmt-formatted `text` with its length in lines, from its `fn` line
/// to the brace that closes it at the same indentation.
fn function_lengths(text: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let Some(name) = function_name(code) else {
            continue;
        };
        let close = format!("{indent}}}");
        if let Some(end) = lines[at..].iter().position(|l| *l == close) {
            found.push((name, end + 1));
        }
    }
    found
}

/// The name a line declares as a function with a body (`pub(crate) async fn name(`), if it
/// does.
fn function_name(code: &str) -> Option<String> {
    let mut words = code.split_whitespace();
    loop {
        let word = words.next()?;
        match word {
            "fn" => break,
            "pub" | "async" | "const" | "unsafe" | "extern" | "\"C\"" => {}
            _ if word.starts_with("pub(") => {}
            _ => return None,
        }
    }
    let name: String = words
        .next()?
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!code.ends_with(';')).then_some(name)
}

#[test]
fn the_checks_see_what_they_check() {
    // The readers above are heuristics over text: each must find what it looks for.
    let text = "use crate::{feed, store::Writer};\nfn f() { crate::lab::x(); }\n";
    assert_eq!(
        imports(text),
        BTreeSet::from(["feed".into(), "store".into(), "lab".into()])
    );
    let source = "pub(crate) fn long(\n    a: u8,\n) {\n}\n    fn inner() {\n    }\nfn decl();\n";
    assert_eq!(
        function_lengths(source),
        [("long".to_owned(), 4), ("inner".to_owned(), 2)]
    );
    assert_eq!(
        without_unit_tests("a\n#[cfg(test)]\nmod tests {\n}\n"),
        "a\n"
    );
}
