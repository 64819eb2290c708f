// Drives ringmq's dashboard (src/http/dashboard.html) in headless Chromium through
// puppeteer-core; run by scripts/acceptance/dashboard.sh, which sets the environment:
//   NODE_DIR  directory holding node_modules/puppeteer-core     CHROMIUM  browser executable
//   URL       the dashboard (http://127.0.0.1:<http port>/)     SHOT      screenshot path (.png)
//   VICTIM    client id to find and kick (dash-victim)          TOKEN     bearer token to type
//   WAIT_S    seconds each step may take (default 30)                     into the page's token box
//
// Prints one "PASS <step>: ..." or "FAIL <step>: ..." line per step; exit status 0 when all
// passed. Every wait polls a condition with a deadline; nothing is asserted after a fixed sleep.
const puppeteer = require(process.env.NODE_DIR + '/node_modules/puppeteer-core');

const URL = process.env.URL;
const VICTIM = process.env.VICTIM || 'dash-victim';
const TOKEN = process.env.TOKEN || '';
const WAIT_MS = 1000 * Number(process.env.WAIT_S || 30);
let failed = 0;
const pass = (step, text) => console.log('PASS ' + step + ': ' + text);
const fail = (step, text) => { failed++; console.log('FAIL ' + step + ': ' + text); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Polls fn (evaluated in the page, with arg) until it returns a truthy value, ms pass or
// stop() holds; types TOKEN into the token box whenever the page shows it. Returns the value
// or null.
async function poll(page, fn, arg, ms = WAIT_MS, stop = () => false) {
  const deadline = Date.now() + ms;
  for (;;) {
    await fillToken(page);
    const v = await page.evaluate(fn, arg).catch(() => null);
    if (v) return v;
    if (Date.now() > deadline || stop()) return null;
    await sleep(200);
  }
}
let tokenTyped = 0;
async function fillToken(page) {
  if (!TOKEN) return;
  const shown = await page.evaluate(() => !document.getElementById('auth').hidden).catch(() => false);
  if (!shown) return;
  tokenTyped++;
  await page.type('#token-input', TOKEN);
  await page.click('#token-save');
}

const rowShown = (id) => [...document.querySelectorAll('#clients tbody tr')].some((tr) => tr.dataset.clientId === id);
const armedShown = (id) => [...document.querySelectorAll('#clients button.kick')]
  .some((b) => b.dataset.clientId === id && b.textContent === 'Confirm?');

// Clicks the kick button of `id` (looked up afresh: the rows are re-rendered every few seconds).
async function clickKick(page, id) {
  const handle = await page.evaluateHandle((id) =>
    [...document.querySelectorAll('#clients button.kick')].find((b) => b.dataset.clientId === id) || null, id);
  const b = handle.asElement();
  if (!b) return false;
  return b.click().then(() => true, () => false);   // false: detached by a re-render in between
}

// Kick, then Confirm? (the page's two-click confirmation), then wait for the row to go. When
// the broker wants a token for DELETE, the page shows its token box: poll() types TOKEN and
// the kick is done again.
async function kick(page) {
  for (let attempt = 0; attempt < 4; attempt++) {
    if (attempt) await sleep(300);
    if (!(await clickKick(page, VICTIM))) continue;
    if (!(await poll(page, armedShown, VICTIM, 3000))) continue;
    if (!(await clickKick(page, VICTIM))) continue;
    const typed = tokenTyped;
    if (await poll(page, (id) => ![...document.querySelectorAll('#clients tbody tr')].some((tr) => tr.dataset.clientId === id),
                   VICTIM, WAIT_MS, () => tokenTyped !== typed)) return true;
    if (tokenTyped === typed) return false;       // still there, and no token was asked for
  }
  return !(await page.evaluate(rowShown, VICTIM));
}

(async () => {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM, headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const pageErrors = [];
  try {
    const page = await browser.newPage();
    page.on('pageerror', (e) => pageErrors.push(e.message));
    // A Content-Security-Policy the page breaks shows as console errors, not as exceptions.
    page.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) pageErrors.push(m.text()); });
    await page.setViewport({ width: 1280, height: 900 });
    const res = await page.goto(URL, { waitUntil: 'domcontentloaded', timeout: WAIT_MS }).catch((e) => e);
    if (!res || res instanceof Error || !res.ok()) {
      fail('dashboard-load', URL + ': ' + (res instanceof Error ? res.message : res ? 'HTTP ' + res.status() : 'no response'));
      return;
    }
    pass('dashboard-load', URL + ' (' + res.headers()['content-type'] + ')');

    // Rates above zero in the tiles and in body's data attributes, lines drawn in the chart.
    const rates = await poll(page, () => {
      const d = document.body.dataset;
      const line = (chart, series) => {
        const p = document.querySelector('#' + chart + ' path.line[data-series="' + series + '"]');
        return p && /^M[^M]*L/.test(p.getAttribute('d') || '') ? p.getAttribute('d').split('L').length : 0;
      };
      const ok = Number(d.rateIn) > 0 && Number(d.rateOut) > 0 && line('chart-msg', 'in') >= 2 && line('chart-msg', 'out') >= 2;
      return ok && { in: d.rateIn, out: d.rateOut, points: line('chart-msg', 'in'),
                     tileIn: document.querySelector('#tile-msg-in .v').textContent,
                     tileOut: document.querySelector('#tile-msg-out .v').textContent };
    });
    if (rates) {
      pass('dashboard-rates', `msg/s in ${rates.in} (tile "${rates.tileIn}"), out ${rates.out} (tile "${rates.tileOut}"), ` +
           `chart line of ${rates.points} points`);
    } else {
      const d = await page.evaluate(() => ({ ...document.body.dataset, status: document.getElementById('status').textContent }));
      fail('dashboard-rates', 'no non-zero msg/s in and out with a drawn line within ' + WAIT_MS / 1000 + ' s: ' + JSON.stringify(d));
    }
    const busy = await poll(page, () => {
      const lines = [...document.querySelectorAll('#chart-busy path.line')].filter((p) => /L/.test(p.getAttribute('d') || ''));
      return lines.length && lines.length;
    }, null, 5000);
    if (busy) pass('dashboard-busy-chart', busy + ' core line(s) drawn');
    else fail('dashboard-busy-chart', 'no per-core line in #chart-busy');

    // A few more seconds of history make a screenshot worth looking at (not a check).
    await poll(page, () => Number(document.body.dataset.samples) >= 10, null, 12000);
    await page.screenshot({ path: process.env.SHOT, fullPage: true });
    pass('dashboard-screenshot', process.env.SHOT);

    // Search by prefix: the victim's row appears and every row shown matches the prefix.
    await page.click('#client-search', { clickCount: 3 });
    await page.type('#client-search', VICTIM);
    const found = await poll(page, (id) => {
      const rows = [...document.querySelectorAll('#clients tbody tr')];
      return rows.some((tr) => tr.dataset.clientId === id) && rows.every((tr) => tr.dataset.clientId.startsWith(id)) && rows.length;
    }, VICTIM);
    if (!found) {
      const ids = await page.evaluate(() => [...document.querySelectorAll('#clients tbody tr')].map((tr) => tr.dataset.clientId).slice(0, 10));
      fail('dashboard-search', `no row for ${VICTIM} (alone with its prefix) within ${WAIT_MS / 1000} s; rows: ${JSON.stringify(ids)}`);
    } else {
      pass('dashboard-search', `"${VICTIM}" typed in #client-search: ${found} matching row(s), the victim's among them`);
      if (await kick(page)) {
        const note = await page.$eval('#clients-msg', (e) => e.textContent);
        pass('dashboard-kick', `Kick, Confirm?: the row of ${VICTIM} is gone (page says "${note}")` +
             (tokenTyped ? `; token typed ${tokenTyped}x` : ''));
      } else {
        const note = await page.$eval('#clients-msg', (e) => e.textContent);
        fail('dashboard-kick', `the row of ${VICTIM} is still shown ${WAIT_MS / 1000} s after Kick, Confirm? (page says "${note}")`);
      }
    }

    const pwned = await page.evaluate(() => document.body.dataset.pwned);
    if (pageErrors.length || pwned) {
      fail('dashboard-page-errors', JSON.stringify({ errors: pageErrors.slice(0, 5), injected: pwned || null }));
    } else {
      pass('dashboard-page-errors', 'no uncaught exception, no CSP violation, no injected markup ran');
    }
  } finally {
    await browser.close();
  }
})().catch((e) => { fail('dashboard-driver', e.stack || e.message); }).finally(() => process.exit(failed ? 1 : 0));
