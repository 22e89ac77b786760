// Drives weir's dashboard in headless Chromium (playwright-core, the
// system's chromium) as an operator would; tests/dashboard_browser.rs runs it
// against a weir it started, after publishing telemetry and connecting a
// terminal with a last will. Prints READY when the Alerts tab is open and
// waiting; the Rust side then drops that terminal's connection, and the
// offline alert must appear without a reload. Exits non-zero, saying why,
// on the first thing that is not as a user would expect.
"use strict";
const { chromium } = require("playwright-core");

const [base, shots, token] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function fail(why) {
  console.error("dashboard check failed: " + why);
  process.exit(1);
}

(async () => {
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
  const page = await browser.newPage({ viewport: { width: 1300, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  const started = Date.now();
  await page.goto(base + "/#fleet", { waitUntil: "load" });
  const loaded = Date.now() - started;
  const fcp = await page.evaluate(() => {
    const p = performance.getEntriesByName("first-contentful-paint")[0];
    return p ? Math.round(p.startTime) : null;
  });
  // what the page itself weighs: the document and its scripts and styles
  const firstWeight = await page.evaluate(() =>
    performance.getEntriesByType("navigation").concat(performance.getEntriesByType("resource"))
      .filter((e) => !e.name.includes("/api/") && !e.name.includes("/metrics"))
      .reduce((s, e) => s + (e.transferSize || e.encodedBodySize || 0), 0));

  // weir has tokens: the page says so until one is given, then loads.
  if (token) {
    await page.waitForFunction(() => !document.querySelector("#banner").hidden &&
      document.querySelector("#banner").textContent.includes("token"), null, { timeout: 10000 })
      .catch(() => fail("without a token the page does not ask for one"));
    await page.fill("#token", token);
    await page.click("#token-form button");
  }

  // Fleet: the terminal and its battery.
  const row = page.locator('tr[data-terminal="T1"]');
  await row.waitFor({ timeout: 30000 }).catch(() => fail("terminal T1 is not in the fleet table"));
  const battery = await row.locator("td.battery").innerText();
  if (!battery.includes("12.5")) fail("T1's battery shows " + JSON.stringify(battery) + ", not 12.5");
  if (!(await row.innerText()).includes("120 ms")) fail("T1's latency (120 ms) is not in its row: " + (await row.innerText()));
  await page.locator("#fleet-cards .card").first().waitFor();
  await page.screenshot({ path: shots + "/fleet.png" });

  // Search happens on the server.
  await page.fill("#search", "t1");
  await page.waitForFunction(() => document.querySelectorAll("#terminals tbody tr[data-terminal]").length === 1, null, { timeout: 10000 })
    .catch(() => fail("searching t1 does not leave T1 alone"));

  // One terminal's page.
  await page.click('a[href="#terminal/T1"]');
  await page.waitForFunction(() => document.querySelector("#terminal-title").textContent.includes("T1") &&
    document.querySelector("#terminal-cards").textContent.includes("12.5"), null, { timeout: 10000 })
    .catch(() => fail("the terminal page does not show T1's battery"));
  await page.waitForSelector("#terminal-chart .u-wrap", { timeout: 10000 }).catch(() => fail("no chart on the terminal page"));
  await page.screenshot({ path: shots + "/terminal.png" });

  // Alerts: the offline alert appears live, then ack.
  await page.click('a[data-tab="alerts"]');
  await page.waitForSelector("#live:not(.off)", { timeout: 10000 }).catch(() => fail("the alert stream did not connect"));
  await page.evaluate(() => { window.__notReloaded = true; });
  console.log("READY");
  const alertRow = page.locator("#open-alerts tr", { hasText: "terminal_offline" }).filter({ hasText: "T7" });
  await alertRow.waitFor({ timeout: 30000 }).catch(() => fail("the offline alert for T7 did not appear"));
  if (!(await page.evaluate(() => window.__notReloaded === true))) fail("the page reloaded");
  await alertRow.locator("button.ack").click();
  await alertRow.filter({ hasText: "acked" }).waitFor({ timeout: 10000 }).catch(() => fail("the alert does not show as acked"));
  const stored = await page.evaluate(async () => {
    const t = sessionStorage.getItem("weir-token");
    const r = await fetch("/api/v1/alerts?rule=terminal_offline&key=T7", { headers: t ? { Authorization: "Bearer " + t } : {} });
    return (await r.json()).items[0];
  });
  if (!stored || stored.acked !== true) fail("the ack did not reach weir: " + JSON.stringify(stored));
  await page.screenshot({ path: shots + "/alerts.png" });

  // Engine and SQL.
  await page.click('a[data-tab="engine"]');
  await page.waitForSelector("#graph svg", { timeout: 10000 }).catch(() => fail("no pipeline graph on the Engine tab"));
  await page.waitForFunction(() => document.querySelector("#engine-cards").textContent.includes("events logged"), null, { timeout: 10000 })
    .catch(() => fail("no engine figures"));
  await page.selectOption("#dead-reason", "malformed");
  await page.waitForFunction(() => document.querySelector("#dead-letters tbody").textContent.includes("malformed"), null, { timeout: 10000 })
    .catch(() => fail("the malformed message is not in the dead-letter browser"));
  await page.screenshot({ path: shots + "/engine.png" });
  await page.click('a[data-tab="sql"]');
  await page.fill("#sql-text", "SELECT terminal_id, battery_pct FROM terminal_latest ORDER BY terminal_id");
  await page.click("#sql-run");
  await page.waitForFunction(() => document.querySelector("#sql-result tbody").textContent.includes("T1"), null, { timeout: 10000 })
    .catch(() => fail("the SQL console did not answer: " + JSON.stringify(errors)));
  // the pipelines' status and a preview beside the console
  await page.waitForFunction(() => document.querySelector("#pipelines").textContent.includes("Last applied reload: start"), null, { timeout: 10000 })
    .catch(() => fail("the pipelines' status is not shown"));
  await page.fill("#preview-text", "CREATE VIEW per_terminal AS SELECT terminal_id, count(*) AS n FROM telemetry GROUP BY terminal_id");
  await page.fill("#preview-from", "-1h");
  await page.click("#preview-run");
  await page.waitForFunction(() => document.querySelector("#preview-result tbody").textContent.includes("T1"), null, { timeout: 10000 })
    .catch(() => fail("the preview did not answer: " + document.querySelector("#preview-status")));
  await page.fill("#preview-text", "CREATE VIEW broken AS SELECT nope FROM telemetry");
  await page.click("#preview-run");
  await page.waitForFunction(() => document.querySelector("#preview-status").textContent.includes("line 1"), null, { timeout: 10000 })
    .catch(() => fail("a broken preview does not say where"));
  await page.screenshot({ path: shots + "/sql.png", fullPage: true });

  // Docs, fetched with the token, links kept inside the tab.
  await page.click('a[data-tab="docs"]');
  await page.waitForSelector('#docs-page a[href="#docs/view-terminal_health_1m.html"]', { timeout: 10000 })
    .catch(() => fail("the Docs tab does not list terminal_health_1m"));
  await page.click('#docs-page a[href="#docs/view-terminal_health_1m.html"]');
  await page.waitForFunction(() => document.querySelector("#docs-page").textContent.includes("tumble(1 minute)"), null, { timeout: 10000 })
    .catch(() => fail("the view's docs page did not open"));
  await page.screenshot({ path: shots + "/docs.png" });

  if (errors.length) fail("errors in the page: " + errors.join("; "));
  console.log("METRICS " + JSON.stringify({ first_page_bytes: firstWeight, load_ms: loaded, first_contentful_paint_ms: fcp }));
  await browser.close();
})().catch((e) => fail(String(e && e.stack || e)));
