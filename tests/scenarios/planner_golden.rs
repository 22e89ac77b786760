//! Planner golden tests: every `tests/planner/*.sql` is planned and the
//! result — the plans `weir check` prints, or every error with its line —
//! must equal `tests/planner/*.out`. Run with `BLESS=1` to rewrite the
//! expected files after a deliberate change, then review the diff.

use std::path::Path;

fn render(file: &str, sql: &str) -> String {
    match weir::plan::plan_sources(&[(file.to_string(), sql.to_string())]) {
        Ok(pipeline) => format!("ok\n{}", weir::plan::describe(&pipeline)),
        Err(errors) => {
            let mut out = String::from("errors\n");
            for e in errors {
                out.push_str(&format!("{e}\n"));
            }
            out
        }
    }
}

#[test]
fn planner_golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/planner");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/planner")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "golden files are missing");
    let bless = std::env::var_os("BLESS").is_some();
    let mut failures = Vec::new();
    for path in files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_string();
        let sql = std::fs::read_to_string(&path).expect("read sql");
        let actual = render(&name, &sql);
        let expected_path = path.with_extension("out");
        // a file named err_* must fail, ok_* must plan
        let ok = actual.starts_with("ok\n");
        assert_eq!(ok, name.starts_with("ok_"), "{name}:\n{actual}");
        if bless {
            std::fs::write(&expected_path, &actual).expect("write golden");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected != actual {
            failures.push(format!("{name}: expected\n{expected}\ngot\n{actual}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
