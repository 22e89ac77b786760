//! The documentation site and the lineage API as a user meets them:
//! `weir docs` over the shipped pipelines writes a site with no warnings,
//! whose links all resolve and which headless Chromium renders with the
//! graph drawn; a running weir serves the same pages at `/docs/` and the
//! lineage at `/api/v1/lineage`, with live figures.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn chromium() -> Option<PathBuf> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(name).output() {
            if out.status.success() {
                return Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
            }
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "chromium is missing on CI (scripts/test installs it)"
    );
    None
}

/// The DOM Chromium builds for `page`, after scripts and layout.
fn dump_dom(browser: &Path, page: &Path) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every `href="..."` of a page.
fn hrefs(html: &str) -> Vec<String> {
    html.split("href=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn weir_docs_writes_a_site_whose_links_resolve_and_chromium_draws_it() {
    let out_dir = tempfile::tempdir().expect("temp dir");
    let site = out_dir.path().join("site");
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["docs", "--out"])
        .arg(&site)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run weir docs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "warnings: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut pages: Vec<PathBuf> = std::fs::read_dir(&site)
        .expect("site")
        .map(|e| e.expect("entry").path())
        .collect();
    pages.sort();
    // an index, 3 streams, 7 views, 4 alerts
    assert_eq!(pages.len(), 15, "{pages:?}");
    for page in &pages {
        let html = std::fs::read_to_string(page).expect("read page");
        for href in hrefs(&html) {
            assert!(
                site.join(&href).is_file(),
                "{}: link {href} does not resolve",
                page.display()
            );
        }
    }
    let health = std::fs::read_to_string(site.join("view-terminal_health_1m.html")).expect("page");
    for expected in [
        "config/pipelines/10_telemetry.sql:23",
        "tumble(1 minute)",
        "min_battery",
        "Battery level, in percent",
        "/api/v1/views/terminal_health_1m/rows",
    ] {
        assert!(
            health.contains(expected),
            "{expected:?} missing from the view's page"
        );
    }
    let low = std::fs::read_to_string(site.join("alert-low_battery.html")).expect("page");
    assert!(
        low.contains(
            "fires when battery_pct &lt; 15 holds for 1 minute; resolves at battery_pct &gt;= 20"
        ),
        "alert semantics in words"
    );

    let Some(browser) = chromium() else {
        eprintln!("chromium not installed: skipping the browser check");
        return;
    };
    let dom = dump_dom(&browser, &site.join("index.html"));
    assert!(dom.contains("<svg"), "the graph is in the page");
    // every node of the graph is drawn, each stream, view and alert a link
    assert_eq!(
        dom.matches("class=\"node\"").count(),
        18,
        "3 topics, 3 streams, 7 views, 4 alerts, 1 sink"
    );
    assert!(dom.contains("href=\"view-merchant_sales_5m.html\""));
    let dom = dump_dom(&browser, &site.join("alert-app_degraded.html"));
    assert!(
        dom.contains("terminal_health_1m"),
        "the alert page names what it reads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_weir_serves_lineage_and_docs_with_live_figures() {
    let weir = Weir::start(&[("telemetry.sql", TELEMETRY)]).await;
    weir.publish(&[
        ("terminals/A/telemetry", event(T0 + 1_000, 80.0, Some(10.0))),
        (
            "terminals/A/telemetry",
            event(T0 + 70_000, 10.0, Some(10.0)),
        ),
    ])
    .await;
    weir.wait_rows("health_1m", 1).await;

    let graph = weir.get_ok("/api/v1/lineage").await;
    let node = |id: &str| {
        graph["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    assert_eq!(node("stream:telemetry")["live"]["events"], 2);
    assert_eq!(node("view:health_1m")["live"]["rows_written"], 1);
    assert_eq!(node("view:health_1m")["window"], "tumble(1 minute)");
    assert!(graph["columns"].as_array().is_some_and(|c| c
        .iter()
        .any(|e| e["from"] == "stream:telemetry.battery_pct"
            && e["to"] == "view:health_1m.min_battery"
            && e["kind"] == "aggregate")));

    let up = weir
        .get_ok("/api/v1/lineage?node=low_battery&direction=upstream")
        .await;
    let ids: Vec<&str> = up["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![
            "topic:terminals/+/telemetry",
            "stream:telemetry",
            "view:low_battery"
        ]
    );

    let dot = weir
        .http
        .get(format!("{}/api/v1/lineage?format=dot", weir.base))
        .send()
        .await
        .expect("dot");
    assert_eq!(dot.status(), 200);
    assert!(dot
        .text()
        .await
        .expect("body")
        .starts_with("digraph lineage {"));
    let (status, body) = weir.get("/api/v1/lineage?format=png").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_request");
    let (status, body) = weir.get("/api/v1/lineage?node=nope").await;
    assert_eq!(status, 404, "{body}");

    let page = weir
        .http
        .get(format!("{}/docs/", weir.base))
        .send()
        .await
        .expect("docs");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains("view-health_1m.html") && html.contains("<svg"));
    let page = weir
        .http
        .get(format!("{}/docs/health_1m", weir.base))
        .send()
        .await
        .expect("docs page");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("html");
    assert!(html.contains("rows written: 1"), "live figures on the page");
    let (status, _) = weir.get("/docs/nothing-here.html").await;
    assert_eq!(status, 404);
    weir.stop().await;
}

/// mermaid.min.js from npm (scripts/test installs it into target/npm).
fn mermaid_js() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/npm/node_modules/mermaid/dist/mermaid.min.js");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "mermaid is missing on CI (scripts/test installs it into target/npm)"
    );
    None
}

/// Renders `diagram` with mermaid.js in Chromium: "ok" and the SVG, or the error.
fn render_mermaid(browser: &Path, mermaid: &Path, diagram: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let page = dir.path().join("m.html");
    let html = format!(
        "<!doctype html><html><body><pre class=\"mermaid\">{}</pre>\n<script src=\"file://{}\"></script>\n<script>\nmermaid.initialize({{startOnLoad: false}});\nmermaid.run().then(() => document.body.setAttribute('data-rendered', 'ok'))\n  .catch(e => document.body.setAttribute('data-rendered', 'error: ' + e));\n</script></body></html>",
        weir::docs::esc(diagram),
        mermaid.display()
    );
    std::fs::write(&page, html).expect("write page");
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new(browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--allow-file-access-from-files",
            "--virtual-time-budget=15000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn mermaid_output_renders_with_mermaid_js() {
    let (Some(browser), Some(mermaid)) = (chromium(), mermaid_js()) else {
        eprintln!("chromium or mermaid missing: skipping the Mermaid render check");
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lineage");
    let mut rendered = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/lineage") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|x| x != "mmd") {
            continue;
        }
        let diagram = std::fs::read_to_string(&path).expect("read");
        let dom = render_mermaid(&browser, &mermaid, &diagram);
        assert!(
            dom.contains("data-rendered=\"ok\"") && dom.contains("<svg"),
            "{} does not render: {}",
            path.display(),
            dom.split("data-rendered=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("no result")
        );
        rendered += 1;
    }
    assert!(rendered >= 3, "golden Mermaid files are missing");
    // and the check can fail
    let dom = render_mermaid(&browser, &mermaid, "flowchart LR\n  a -->");
    assert!(
        !dom.contains("data-rendered=\"ok\""),
        "a broken diagram must not pass"
    );
}
