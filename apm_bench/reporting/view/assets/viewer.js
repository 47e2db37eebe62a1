/* apm-bench viewer: draws the payload in <script id="apm-data"> (kinds "run", "runs", "leaderboard").
 * Plain ES2017, no libraries, works from file://. The data contract: docs of `apm view` (view-contract).
 * Every text comes from data and is added as a text node; nothing from data ever reaches innerHTML.
 *
 * Stable hooks (tests and links rely on them):
 *   body[data-kind]                         the payload's kind; body.eval-on while the evaluation view is on
 *   run page     #run-header  #simulator-badge  #tab-results #tab-samples #tab-details (links to #results,
 *                #samples, #details)  #panel-results #panel-samples #panel-details #user-view
 *                #pooled-table  #delta-plot (svg; g.forest-row[data-method])  #world-table  #label-table
 *                #training-curves (svg.training-plot[data-method])  #training-table  #cost-table  #config-table
 *   samples      #filter-world #filter-method #filter-outcome #filter-principle (select; "" = any)
 *                #filter-sort ("" | "asc" | "desc": by the chosen method's Δ)
 *                #sample-list (table) tbody tr.sample-row[data-world][data-user]  #page-status
 *                #prev-page #next-page  #samples-message (loading/errors)
 *   user view    route #user/<world>/<user_id>; #user-view[data-world][data-user]  #back-to-list
 *                #prev-user #next-user (within the filtered list)  #eval-toggle (checkbox)
 *                #user-history  #user-prompt  .eval-only (shown only with the evaluation view)
 *                #column-picker input[data-method] (unchecked: that method's column is hidden)
 *                #eval-panel  #true-label  #user-targets tr.target[data-principle]  #user-attributes
 *                .method-column[data-method] with .response .system-prompt .summary .adapter
 *                .context .message[data-role] .generation-error .reward .delta
 *                .rating[data-principle][data-index] (text: the rating, or "failed")
 *                .routing-check[data-correct="true"|"false"] (eval only)
 *   leaderboard  #leaderboard  table.leaderboard-table[data-setting]  th[data-key] (click sorts; th gets
 *                data-sort="desc"|"asc")  tbody tr[data-method]  a.run-link
 *   runs list    #runs-table  tr[data-run]  a.run-link
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- sidecar data (index + chunks)
  const store = { index: null, chunks: {}, waiting: {} };

  function settle(key, ok, value) {
    const waiting = store.waiting[key];
    if (!waiting) return;
    delete store.waiting[key];
    waiting.forEach((w) => (ok ? w.resolve(value) : w.reject(new Error(value))));
  }

  window.apmIndex = function (index) { store.index = index; settle('index', true, index); };
  window.apmChunk = function (n, users) { store.chunks[n] = users; settle('chunk:' + n, true, users); };

  /** Resolves with data already registered, or injects its script once and waits for it to register. */
  function want(key, have, src) {
    if (have) return Promise.resolve(have);
    return new Promise((resolve, reject) => {
      const first = !store.waiting[key];
      (store.waiting[key] = store.waiting[key] || []).push({ resolve, reject });
      if (!first) return;
      const tag = document.createElement('script');
      tag.src = src;
      tag.onerror = () => settle(key, false, 'could not load ' + src + ' (is its folder still next to this page?)');
      tag.onload = () => settle(key, false, src + ' loaded but registered no data');
      document.body.appendChild(tag);
    });
  }

  const loadIndex = (samples) => want('index', store.index, samples.index_src);
  const loadChunk = (samples, n) =>
    want('chunk:' + n, store.chunks[n], samples.chunk_src.replace('{n}', String(n).padStart(4, '0')));

  // ---------------------------------------------------------------- DOM helpers (text only)
  const SVG_NS = 'http://www.w3.org/2000/svg';
  const PROPS = new Set(['checked', 'value', 'selected', 'disabled', 'hidden']);

  function build(node, attrs, kids) {
    Object.entries(attrs || {}).forEach(([key, value]) => {
      if (value === null || value === undefined || value === false) return;
      if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (PROPS.has(key) && !(node instanceof SVGElement)) node[key] = value;
      else node.setAttribute(key, value === true ? '' : String(value));
    });
    kids.flat(Infinity).forEach((kid) => {
      if (kid === null || kid === undefined || kid === false) return;
      node.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    });
    return node;
  }
  const h = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
  const s = (tag, attrs, ...kids) => build(document.createElementNS(SVG_NS, tag), attrs, kids);
  const byId = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- formatting
  const isNum = (v) => typeof v === 'number' && isFinite(v);
  const DASH = '–';
  const fixed = (v, d = 2) => (isNum(v) ? v.toFixed(d) : DASH);
  const signed = (v, d = 2) => (isNum(v) ? (v > 0 ? '+' : '') + v.toFixed(d) : DASH);
  const pct = (v) => (isNum(v) ? Math.round(v * 100) + '%' : DASH);
  const count = (v) => (isNum(v) ? v.toLocaleString('en-US') : DASH);
  const ci = (lo, hi) => (isNum(lo) && isNum(hi) ? '[' + fixed(lo) + ', ' + fixed(hi) + ']' : DASH);
  const wtl = (r) => pct(r.win) + ' / ' + pct(r.tie) + ' / ' + pct(r.loss);
  const rating = (v) => (isNum(v) ? String(Math.round(v * 100) / 100) : 'failed');
  const seconds = (v) => (isNum(v) ? (v < 10 ? v.toFixed(2) : v.toFixed(1)) + ' s' : DASH);
  const plain = (v) => (v === null || v === undefined ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v));

  function outcome(delta) {
    if (!isNum(delta)) return 'failed';
    return delta > 0 ? 'win' : delta < 0 ? 'loss' : 'tie';
  }
  const deltaCell = (v) => h('span', { class: 'delta delta-' + outcome(v) }, signed(v));
  /** Identifiers like presents_multiple_perspectives may break after their underscores. */
  const breakable = (text) => plain(text).split('_').map((part, i, all) => (i < all.length - 1 ? [part + '_', h('wbr')] : part));
  const simBadge = (id) => h('span', { class: 'badge sim', id, title: 'texts and ratings come from the built-in simulator' }, 'simulator');

  // ---------------------------------------------------------------- tables
  /** columns: {key, label, num?, cell?(row) -> node|text, sort?(row) -> value, title?} */
  function table(columns, rows, attrs) {
    const head = h('thead', null, h('tr', null, columns.map((c) =>
      h('th', { 'data-key': c.key, class: c.num ? 'num' : null, title: c.title }, c.label))));
    return h('table', Object.assign({ class: 'data' }, attrs), head, h('tbody', null, rows.map((r) => tableRow(columns, r))));
  }

  function tableRow(columns, row) {
    return h('tr', { 'data-method': row.method, 'data-run': row.run_id },
      columns.map((c) => h('td', { class: c.num ? 'num' : null }, c.cell ? c.cell(row) : plain(row[c.key]))));
  }

  /** Clicking a header sorts by it: numbers descending first, text ascending first; empties stay last. */
  function sortable(columns, rows, attrs) {
    const node = table(columns, rows, Object.assign({ class: 'data sortable' }, attrs));
    node.querySelectorAll('th').forEach((th, i) => {
      th.tabIndex = 0;
      const go = () => sortBy(node, columns[i], th, rows, columns);
      th.addEventListener('click', go);
      th.addEventListener('keydown', (e) => { if (e.key === 'Enter') go(); });
    });
    return node;
  }

  function sortBy(node, column, th, rows, columns) {
    const value = column.sort || ((r) => r[column.key]);
    const numeric = rows.some((r) => isNum(value(r)));
    const dir = th.dataset.sort ? (th.dataset.sort === 'desc' ? 'asc' : 'desc') : (numeric ? 'desc' : 'asc');
    node.querySelectorAll('th').forEach((other) => { delete other.dataset.sort; other.removeAttribute('aria-sort'); });
    th.dataset.sort = dir;
    th.setAttribute('aria-sort', dir === 'asc' ? 'ascending' : 'descending');
    const empty = (v) => v === null || v === undefined || v === '' || (typeof v === 'number' && !isFinite(v));
    const sorted = rows.slice().sort((a, b) => {
      const x = value(a), y = value(b);
      if (empty(x) || empty(y)) return empty(x) - empty(y);
      const c = numeric ? x - y : String(x).localeCompare(String(y));
      return dir === 'asc' ? c : -c;
    });
    node.tBodies[0].replaceChildren(...sorted.map((r) => tableRow(columns, r)));
  }

  function keyValueTable(object, attrs) {
    const rows = Object.entries(object || {}).map(([key, value]) => h('tr', null, h('th', { scope: 'row' }, key),
      h('td', null, value !== null && typeof value === 'object' ? h('code', { class: 'json' }, JSON.stringify(value, null, 1)) : plain(value))));
    return h('table', Object.assign({ class: 'data kv' }, attrs), h('tbody', null, rows));
  }

  /** Long tables fold away behind a summary line. */
  const many = (n, what, node) => (n > 12 ? h('details', null, h('summary', null, n + ' ' + what), node) : node);
  const section = (title, ...kids) => h('section', { class: 'card' }, h('h2', null, title), kids);
  const note = (text, attrs) => h('p', Object.assign({ class: 'note' }, attrs), text);

  // ---------------------------------------------------------------- SVG plots
  function niceTicks(lo, hi, n) {
    const raw = (hi - lo) / Math.max(n, 1);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((m) => m >= raw) || raw;
    const ticks = [];
    for (let t = Math.floor(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Math.round(t / step) * step);
    if (ticks[ticks.length - 1] < hi) ticks.push(ticks[ticks.length - 1] + step);
    return ticks;
  }
  const tickText = (t) => String(Math.round(t * 1000) / 1000);

  /** Forest plot: one row per method, a dot at Δ, a bar over the 95 % CI, a dashed line at zero. */
  function forestPlot(rows) {
    const W = 820, left = 160, right = 170, rowH = 26, top = 8, axisH = 30;
    const values = [0].concat(...rows.map((r) => [r.delta, r.ci_low, r.ci_high].filter(isNum)));
    let lo = Math.min(...values), hi = Math.max(...values);
    if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
    const ticks = niceTicks(lo, hi, 6);
    lo = ticks[0]; hi = ticks[ticks.length - 1];
    const x = (v) => left + ((v - lo) / (hi - lo)) * (W - left - right);
    const H = top + rows.length * rowH + axisH, bottom = top + rows.length * rowH;
    const grid = ticks.map((t) => s('g', { class: 'tick' },
      s('line', { x1: x(t), x2: x(t), y1: top, y2: bottom, class: t === 0 ? 'zero' : 'grid' }),
      s('text', { x: x(t), y: bottom + 18, 'text-anchor': 'middle' }, tickText(t))));
    const marks = rows.map((r, i) => {
      const y = top + i * rowH + rowH / 2;
      const tip = r.method + ': Δ ' + signed(r.delta) + ', 95% CI ' + ci(r.ci_low, r.ci_high) + ', n = ' + count(r.n_users);
      return s('g', { class: 'forest-row', 'data-method': r.method }, s('title', null, tip),
        s('rect', { x: 0, y: y - rowH / 2, width: W, height: rowH, class: 'hover' }),
        s('text', { x: left - 10, y: y + 4, 'text-anchor': 'end', class: 'label' }, r.method),
        isNum(r.ci_low) && isNum(r.ci_high) ? s('line', { x1: x(r.ci_low), x2: x(r.ci_high), y1: y, y2: y, class: 'ci' }) : null,
        isNum(r.delta) ? s('circle', { cx: x(r.delta), cy: y, r: 5, class: 'point delta-' + outcome(r.delta) }) : null,
        s('text', { x: W - right + 12, y: y + 4, class: 'value' }, signed(r.delta) + '  ' + ci(r.ci_low, r.ci_high)));
    });
    return s('svg', { id: 'delta-plot', class: 'plot', viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, role: 'img',
      'aria-label': 'reward difference to the baseline per method, with 95% confidence intervals' },
      grid, s('text', { x: x(0), y: H - 1, 'text-anchor': 'middle', class: 'axis-title' }, 'Δ reward vs baseline'), marks);
  }

  const PALETTE = ['#2f6fdb', '#d9622b', '#2e9d5b', '#a044c2', '#c23b4e', '#1c9aa8', '#8a6d1f', '#55606e'];

  /** One small chart per method: a line of training loss over steps for each adapter. */
  function trainingPlot(method, entries) {
    const W = 420, H = 220, left = 46, right = 12, top = 12, bottom = 34;
    const steps = Math.max(1, ...entries.map((e) => e.steps || (e.losses || []).length));
    const losses = [].concat(...entries.map((e) => (e.losses || []).filter(isNum)));
    let lo = Math.min(...losses), hi = Math.max(...losses);
    if (!losses.length) { lo = 0; hi = 1; } else if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const yTicks = niceTicks(lo, hi, 4);
    lo = yTicks[0]; hi = yTicks[yTicks.length - 1];
    const x = (step) => left + (step / steps) * (W - left - right);
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (H - top - bottom);
    const axes = yTicks.map((t) => s('g', { class: 'tick' }, s('line', { x1: left, x2: W - right, y1: y(t), y2: y(t), class: 'grid' }),
      s('text', { x: left - 6, y: y(t) + 4, 'text-anchor': 'end' }, tickText(t))))
      .concat(niceTicks(0, steps, 4).filter((t) => t <= steps).map((t) =>
        s('text', { x: x(t), y: H - bottom + 16, 'text-anchor': 'middle', class: 'tick' }, tickText(t))));
    const lines = entries.map((e, i) => {
      const pts = (e.losses || []).map((v, j, all) => (isNum(v) ? x((all.length > 1 ? j / (all.length - 1) : 1) * (e.steps || all.length)).toFixed(1) + ',' + y(v).toFixed(1) : null)).filter(Boolean);
      return s('polyline', { points: pts.join(' '), class: 'curve', stroke: PALETTE[i % PALETTE.length] },
        s('title', null, e.name + ' (world ' + e.world + '): ' + count(e.steps) + ' steps, final loss ' + fixed(e.final_loss, 3)));
    });
    const list = h('ul', { class: 'legend' }, entries.map((e, i) => h('li', null,
      h('span', { class: 'swatch', style: 'background:' + PALETTE[i % PALETTE.length] }), e.name + ' · world ' + e.world + (e.reused ? ' (reused)' : ''))));
    const legend = entries.length > 6 ? h('details', null, h('summary', { class: 'muted' }, entries.length + ' adapters'), list) : list;
    return h('figure', { class: 'training' }, h('figcaption', null, method),
      s('svg', { class: 'plot training-plot', 'data-method': method, viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, role: 'img', 'aria-label': 'training loss of ' + method },
        axes, lines, s('text', { x: (left + W - right) / 2, y: H - 2, 'text-anchor': 'middle', class: 'axis-title' }, 'step')),
      legend);
  }

  // ---------------------------------------------------------------- run page: results and details
  const METRIC_COLUMNS = [
    { key: 'method', label: 'method' },
    { key: 'n_users', label: 'n', num: true, cell: (r) => count(r.n_users) },
    { key: 'delta', label: 'Δ', num: true, cell: (r) => deltaCell(r.delta), title: 'mean reward minus the baseline\'s' },
    { key: 'ci', label: '95% CI', num: true, cell: (r) => ci(r.ci_low, r.ci_high) },
    { key: 'wtl', label: 'W / T / L', num: true, cell: wtl, title: 'share of users won, tied, lost against the baseline' },
    { key: 'gain', label: 'gain', num: true, cell: (r) => fixed(r.gain) },
    { key: 'mean_reward', label: 'mean reward', num: true, cell: (r) => fixed(r.mean_reward) },
    { key: 'failed_ratings', label: 'failed ratings', num: true, cell: (r) => count(r.failed_ratings) },
  ];

  function runHeader(p) {
    const meta = [p.model && 'model ' + p.model, p.created && 'created ' + p.created,
      isNum(p.wall_seconds) && 'wall time ' + seconds(p.wall_seconds),
      (p.worlds || []).length && 'worlds ' + p.worlds.join(', ')].filter(Boolean).join(' · ');
    return h('header', { id: 'run-header', class: 'page-header' },
      h('h1', null, p.title || 'apm-bench run', p.simulated ? simBadge('simulator-badge') : null),
      h('p', { class: 'meta' }, h('code', null, p.run_id || ''), meta ? ' · ' + meta : ''),
      p.simulated ? note('Simulated run: responses and ratings come from apm-bench\'s built-in simulator, not from language models. ' +
        'The numbers test the harness and the methods\' logic, not any model.', { class: 'note sim-note' }) : null);
  }

  function resultsPanel(p) {
    const rows = (p.metrics || []).filter((m) => m.method !== p.baseline);
    const pooled = rows.filter((m) => m.world === 'pooled');
    const base = (p.metrics || []).find((m) => m.method === p.baseline && m.world === 'pooled');
    const perWorld = rows.filter((m) => m.world !== 'pooled');
    const worldCols = [{ key: 'world', label: 'world' }].concat(METRIC_COLUMNS);
    return h('div', { id: 'panel-results', class: 'panel' },
      section('Pooled over worlds',
        base ? note((p.baseline === 'baseline' ? 'baseline' : 'baseline (' + p.baseline + ')') + ' mean reward ' + fixed(base.mean_reward) + ' over ' + count(base.n_users) + ' users') : null,
        table(METRIC_COLUMNS, pooled, { id: 'pooled-table' }),
        pooled.length ? h('div', { class: 'plot-wrap' }, forestPlot(pooled)) : null),
      perWorld.length ? section('Per world', table(worldCols, perWorld, { id: 'world-table' })) : null,
      labelSection(p.label_diagnostics || []),
      trainingSection(p.training || []));
  }

  function labelSection(rows) {
    if (!rows.length) return null;
    const columns = [
      { key: 'method', label: 'method' }, { key: 'world', label: 'world' },
      { key: 'n_users', label: 'users', num: true, cell: (r) => count(r.n_users) },
      { key: 'label_accuracy', label: 'label accuracy', num: true, cell: (r) => pct(r.label_accuracy) },
      { key: 'principle_accuracy', label: 'principle accuracy', num: true, cell: (r) => pct(r.principle_accuracy) },
      { key: 'training_label_accuracy', label: 'training label accuracy', num: true, cell: (r) => pct(r.training_label_accuracy) },
      { key: 'training_users', label: 'training users', num: true, cell: (r) => count(r.training_users) },
      { key: 'confusion', label: 'confusion', cell: (r) => confusion(r.confusion) },
    ];
    return section('Routing diagnostics', note('How often the routed label matches the user\'s true label on the test users.'),
      table(columns, rows, { id: 'label-table' }));
  }

  /** confusion: {true label: {predicted label: count}}; rows are true labels, columns predictions. */
  function confusion(matrix) {
    const truth = Object.keys(matrix || {});
    if (!truth.length) return DASH;
    const predicted = Array.from(new Set([].concat(...truth.map((t) => Object.keys(matrix[t]))))).sort();
    return h('details', null, h('summary', null, truth.length + ' labels'),
      h('table', { class: 'data confusion' },
        h('thead', null, h('tr', null, h('th', null, 'true \\ predicted'), predicted.map((c) => h('th', { class: 'num' }, c)))),
        h('tbody', null, truth.map((t) => h('tr', null, h('th', { scope: 'row' }, t),
          predicted.map((c) => h('td', { class: 'num' + (c === t ? ' diag' : '') }, count(matrix[t][c] || 0))))))));
  }

  function trainingSection(entries) {
    if (!entries.length) return null;
    const groups = {};
    entries.forEach((e) => (groups[e.method] = groups[e.method] || []).push(e));
    const columns = [
      { key: 'method', label: 'method' }, { key: 'world', label: 'world' }, { key: 'name', label: 'adapter' },
      { key: 'steps', label: 'steps', num: true, cell: (r) => count(r.steps) },
      { key: 'examples', label: 'examples', num: true, cell: (r) => count(r.examples) },
      { key: 'seconds', label: 'time', num: true, cell: (r) => seconds(r.seconds) },
      { key: 'final_loss', label: 'final loss', num: true, cell: (r) => fixed(r.final_loss, 3) },
      { key: 'reused', label: 'reused', cell: (r) => (typeof r.reused === 'boolean' ? (r.reused ? 'yes' : 'no') : DASH) },
    ];
    return section('Training',
      h('div', { id: 'training-curves', class: 'training-grid' }, Object.keys(groups).map((m) => trainingPlot(m, groups[m]))),
      many(entries.length, 'training runs', table(columns, entries, { id: 'training-table' })));
  }

  function detailsPanel(p) {
    const costs = Object.entries(p.costs || {});
    const keys = Array.from(new Set([].concat(...costs.map(([, v]) => Object.keys(v || {})))));
    const costCols = [{ key: 'stage', label: 'stage' }].concat(keys.map((k) => ({
      key: k, label: k, num: true, cell: (r) => (k === 'seconds' ? seconds(r[k]) : isNum(r[k]) ? count(r[k]) : plain(r[k])) })));
    return h('div', { id: 'panel-details', class: 'panel' },
      section('Cost per stage', costs.length
        ? table(costCols, costs.map(([stage, v]) => Object.assign({ stage }, v)), { id: 'cost-table' })
        : note('No costs were recorded.')),
      section('Configuration', keyValueTable(p.config, { id: 'config-table' })));
  }

  // ---------------------------------------------------------------- run page: sample browser
  const ui = { filters: { world: '', method: '', outcome: '', principle: '', sort: '' }, page: 0, list: [], evalView: false,
    hiddenColumns: new Set() };

  const userHash = (world, user) => '#user/' + encodeURIComponent(world) + '/' + encodeURIComponent(user);

  /** Positions of the index that pass the filters, in display order or sorted by Δ. */
  function filtered(index, methods) {
    const f = ui.filters;
    const chosen = f.method ? [f.method] : methods;
    const picked = [];
    for (let i = 0; i < index.user_id.length; i += 1) {
      if (f.world !== '' && String(index.world[i]) !== f.world) continue;
      if (f.principle && !(index.principles[i] || []).includes(f.principle)) continue;
      if (f.outcome && !chosen.some((m) => outcome(((index.delta || {})[m] || [])[i]) === f.outcome)) continue;
      picked.push(i);
    }
    if (!f.sort) return picked;
    const key = (i) => {
      const ds = chosen.map((m) => ((index.delta || {})[m] || [])[i]).filter(isNum);
      return ds.length ? ds.reduce((a, b) => a + b, 0) / ds.length : null;
    };
    return picked.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      return f.sort === 'asc' ? x - y : y - x;
    });
  }

  function select(id, label, options, current, onChange) {
    return h('label', { class: 'filter' }, label,
      h('select', { id, onchange: (e) => onChange(e.target.value) },
        options.map(([value, text]) => h('option', { value, selected: value === current }, text))));
  }

  function samplesPanel(p) {
    const panel = h('div', { id: 'panel-samples', class: 'panel' });
    const info = p.samples || {};
    if (!info.available) {
      panel.append(section('Samples', note(info.reason || 'This run folder has no per-user samples.', { id: 'samples-message' })));
      return { panel, show() {} };
    }
    const methods = info.methods || [];
    const body = h('div', { class: 'samples-body' }, note('loading samples…', { id: 'samples-message' }));
    panel.append(section('Samples', body));
    let started = false;
    return { panel, show() {
      if (started) return;
      started = true;
      loadIndex(info).then((index) => renderBrowser(body, p, index, methods))
        .catch((err) => body.replaceChildren(note(err.message, { id: 'samples-message', class: 'note error' })));
    } };
  }

  function renderBrowser(body, p, index, methods) {
    const f = ui.filters;
    const set = (key) => (value) => { f[key] = value; ui.page = 0; refresh(); };
    const worlds = (p.worlds && p.worlds.length ? p.worlds : Array.from(new Set(index.world)));
    const principles = (p.principles && p.principles.length ? p.principles
      : Array.from(new Set([].concat(...index.principles.map((x) => x || []))))).slice().sort();
    const filters = h('div', { class: 'filters' },
      select('filter-world', 'world', [['', 'any']].concat(worlds.map((w) => [String(w), String(w)])), f.world, set('world')),
      select('filter-method', 'method', [['', 'any']].concat(methods.map((m) => [m, m])), f.method, set('method')),
      select('filter-outcome', 'outcome vs ' + (p.baseline || 'baseline'), [['', 'any'], ['win', 'win (Δ > 0)'], ['tie', 'tie (Δ = 0)'],
        ['loss', 'loss (Δ < 0)'], ['failed', 'failed']], f.outcome, set('outcome')),
      select('filter-principle', 'target principle', [['', 'any']].concat(principles.map((x) => [x, x])), f.principle, set('principle')),
      select('filter-sort', 'order', [['', 'as listed'], ['asc', 'Δ ascending'], ['desc', 'Δ descending']], f.sort, set('sort')));
    const list = h('div', { class: 'list-wrap' });
    const status = h('span', { id: 'page-status', role: 'status' });
    const prev = h('button', { id: 'prev-page', type: 'button', onclick: () => { ui.page -= 1; refresh(); } }, '← prev');
    const next = h('button', { id: 'next-page', type: 'button', onclick: () => { ui.page += 1; refresh(); } }, 'next →');
    const hint = note('', { class: 'note hint' });
    body.replaceChildren(filters, hint, h('div', { class: 'pager' }, prev, status, next), list);

    function refresh() {
      const size = Math.max(1, (p.samples && p.samples.page_size) || 50);
      ui.list = filtered(index, methods);
      const pages = Math.max(1, Math.ceil(ui.list.length / size));
      ui.page = Math.min(Math.max(ui.page, 0), pages - 1);
      const start = ui.page * size, shown = ui.list.slice(start, start + size);
      status.textContent = ui.list.length ? 'showing ' + (start + 1) + '–' + (start + shown.length) + ' of ' + ui.list.length + ' users'
        : 'no users match these filters';
      prev.disabled = ui.page === 0;
      next.disabled = ui.page >= pages - 1;
      hint.textContent = !f.method && f.outcome ? 'method "any": a user is listed when at least one method has this outcome.' : '';
      list.replaceChildren(sampleTable(index, shown, f.method ? [f.method] : methods));
      list.scrollTop = 0;
    }
    refresh();
  }

  function sampleTable(index, positions, methods) {
    const head = h('tr', null, h('th', null, 'world'), h('th', null, 'user'), h('th', null, 'top principle'),
      methods.map((m) => h('th', { class: 'num' }, 'Δ ' + m)), methods.length === 1 ? h('th', null, 'outcome') : null);
    const rows = positions.map((i) => {
      const world = index.world[i], user = index.user_id[i];
      const deltas = methods.map((m) => ((index.delta || {})[m] || [])[i]);
      return h('tr', { class: 'sample-row', 'data-world': world, 'data-user': user, tabindex: 0,
        onclick: () => { location.hash = userHash(world, user); },
        onkeydown: (e) => { if (e.key === 'Enter') location.hash = userHash(world, user); } },
        h('td', null, String(world)), h('td', null, h('a', { href: userHash(world, user) }, user)), h('td', null, plain(index.top[i])),
        deltas.map((d) => h('td', { class: 'num' }, deltaCell(d))),
        methods.length === 1 ? h('td', null, h('span', { class: 'badge outcome-' + outcome(deltas[0]) }, outcome(deltas[0]))) : null);
    });
    return h('table', { id: 'sample-list', class: 'data samples' }, h('thead', null, head), h('tbody', null, rows));
  }

  // ---------------------------------------------------------------- run page: user view
  function setEvalView(on) {
    ui.evalView = on;
    document.body.classList.toggle('eval-on', on);
  }

  let userToken = 0;
  function showUser(view, p, world, user) {
    const token = (userToken += 1);
    view.dataset.world = world;
    view.dataset.user = user;
    view.replaceChildren(note('loading user ' + user + '…'));
    const info = p.samples || {};
    if (!info.available) { view.replaceChildren(note(info.reason || 'This run has no samples.', { class: 'note error' })); return; }
    loadIndex(info).then((index) => {
      const pos = index.user_id.findIndex((u, i) => u === user && String(index.world[i]) === world);
      if (pos < 0) throw new Error('no user ' + user + ' in world ' + world);
      return loadChunk(info, index.chunk[pos]).then((users) => ({ pos, found: users.find((u) => u.user_id === user && String(u.world) === world) }));
    }).then(({ pos, found }) => {
      if (token !== userToken) return;
      if (!found) throw new Error('user ' + user + ' is missing from its data file');
      view.replaceChildren(...userPage(p, found, pos));
      window.scrollTo(0, 0);
    }).catch((err) => { if (token === userToken) view.replaceChildren(note(err.message, { class: 'note error' })); });
  }

  function userNav(pos) {
    const at = ui.list.indexOf(pos);
    const go = (step) => () => {
      const target = ui.list[at + step];
      const index = store.index;
      location.hash = userHash(index.world[target], index.user_id[target]);
    };
    return [h('button', { id: 'prev-user', type: 'button', disabled: at <= 0, onclick: go(-1) }, '← previous user'),
      h('span', { class: 'muted' }, at >= 0 ? (at + 1) + ' of ' + ui.list.length + ' in the list' : 'not in the filtered list'),
      h('button', { id: 'next-user', type: 'button', disabled: at < 0 || at >= ui.list.length - 1, onclick: go(1) }, 'next user →')];
  }

  function userPage(p, u, pos) {
    const toggle = h('label', { class: 'eval-toggle', title: 'reveal what the methods never see: attributes, target sides and weights, true labels' },
      h('input', { type: 'checkbox', id: 'eval-toggle', checked: ui.evalView, onchange: (e) => setEvalView(e.target.checked) }), ' Evaluation view');
    const order = [p.baseline, ui.filters.method].concat(p.methods || []).concat(Object.keys(u.samples || {}));
    const shown = Array.from(new Set(order)).filter((m) => u.samples && u.samples[m]);
    const history = u.history || [];
    return [
      h('div', { class: 'user-toolbar' }, h('a', { id: 'back-to-list', href: '#samples' }, '← samples'), userNav(pos), toggle),
      h('h2', { class: 'user-title' }, 'World ' + u.world + ' · user ' + u.user_id),
      evalPanel(u),
      h('section', { class: 'card', id: 'user-history' },
        h('h3', null, p.samples.has_history === false ? 'History' : 'History (' + history.length + ' messages)'),
        p.samples.has_history === false ? note('This run folder predates recorded histories.')
          : history.length ? h('ol', { class: 'history' }, history.map((m) => h('li', { class: 'text' }, m))) : note('No history.')),
      h('section', { class: 'card' }, h('h3', null, 'Prompt'), h('div', { id: 'user-prompt', class: 'text prompt' }, plain(u.prompt))),
      methodColumns(shown, (m) => methodColumn(m, u.samples[m], u, m === p.baseline))];
  }

  /** Side-by-side columns, with a picker to hide some (the choice is kept from user to user). */
  function methodColumns(methods, column) {
    const grid = h('div', { class: 'method-columns' });
    const layout = () => {
      const shown = methods.filter((m) => !ui.hiddenColumns.has(m));
      grid.replaceChildren(...shown.map(column));
      grid.style.gridTemplateColumns = 'repeat(' + Math.max(shown.length, 1) + ', minmax(260px, 1fr))';
    };
    const pick = (m) => (e) => { ui.hiddenColumns[e.target.checked ? 'delete' : 'add'](m); layout(); };
    layout();
    return h('div', { class: 'methods' }, h('div', { id: 'column-picker', class: 'column-picker' }, 'columns:', methods.map((m) =>
      h('label', null, h('input', { type: 'checkbox', 'data-method': m, checked: !ui.hiddenColumns.has(m), onchange: pick(m) }), ' ' + m))), grid);
  }

  function evalPanel(u) {
    const targets = u.targets || [];
    return h('section', { class: 'card eval-only', id: 'eval-panel' }, h('h3', null, 'Evaluation view: hidden from the methods'),
      h('p', null, 'true label: ', h('strong', { id: 'true-label' }, plain(u.true_label) || DASH)),
      h('table', { class: 'data', id: 'user-targets' },
        h('thead', null, h('tr', null, h('th', null, 'target principle'), h('th', null, 'side'), h('th', { class: 'num' }, 'weight'))),
        h('tbody', null, targets.map((t) => h('tr', { class: 'target', 'data-principle': t.principle },
          h('td', null, t.principle), h('td', null, plain(t.side)), h('td', { class: 'num' }, fixed(t.weight, 3)))))),
      h('p', { id: 'user-attributes' }, 'attributes: ', (u.attributes || []).length
        ? (u.attributes || []).map((a) => plain(a.side) + ' ' + plain(a.attribute)).join(', ') : 'none'));
  }

  function methodColumn(method, x, u, isBaseline) {
    const targets = u.targets || [];
    const context = x.context || [];
    const correct = x.routed_to !== null && x.routed_to !== undefined ? x.routed_to === u.true_label : null;
    const ratingRows = (x.ratings || []).map((r, i) => {
      const t = targets[i] || {};
      return h('tr', null, h('td', null, breakable(t.principle)),
        h('td', { class: 'num rating' + (isNum(r) ? '' : ' failed'), 'data-principle': t.principle, 'data-index': i }, rating(r)),
        h('td', { class: 'eval-only' }, plain(t.side)), h('td', { class: 'num eval-only' }, fixed(t.weight, 3)));
    });
    return h('article', { class: 'method-column' + (isBaseline ? ' baseline' : ''), 'data-method': method },
      h('header', null, h('h3', null, method, isBaseline ? h('span', { class: 'badge' }, 'baseline') : null),
        h('div', { class: 'scores' }, 'reward ', h('strong', { class: 'reward' }, fixed(x.reward)),
          isBaseline ? null : [' · Δ ', h('strong', { class: 'delta delta-' + outcome(x.delta) }, signed(x.delta))],
          x.failed_ratings ? ' · ' + x.failed_ratings + ' failed ratings' : null)),
      correct === null ? null : h('p', { class: 'routing-check eval-only', 'data-correct': String(correct) },
        'predicted ', h('strong', null, plain(x.routed_to)), ' · true ', h('strong', null, plain(u.true_label)), correct ? ' ✓' : ' ✗'),
      h('details', { class: 'sent', open: true }, h('summary', null, 'Sent to the model'),
        x.adapter ? h('p', { class: 'adapter' }, 'adapter: ', h('code', null, plain(x.adapter))) : null,
        h('h4', null, 'system prompt'),
        x.system_prompt ? h('div', { class: 'text system-prompt' }, x.system_prompt) : h('p', { class: 'system-prompt muted' }, '(none)'),
        x.summary ? [h('h4', null, 'summary'), h('div', { class: 'text summary' }, plain(x.summary))] : null,
        context.length ? [h('h4', null, 'context messages (' + context.length + ')'), h('div', { class: 'context' },
          context.map((m) => h('div', { class: 'message', 'data-role': m.role }, h('span', { class: 'role' }, plain(m.role)), h('div', { class: 'text' }, plain(m.content)))))] : null,
        x.context_trimmed ? note(x.context_trimmed + ' context messages trimmed to fit the budget') : null),
      h('h4', null, 'response'),
      x.generation_error ? h('p', { class: 'generation-error' }, 'generation failed: ' + x.generation_error) : null,
      h('div', { class: 'text response' }, plain(x.response)),
      h('h4', null, 'ratings'),
      h('table', { class: 'data ratings' }, h('thead', null, h('tr', null, h('th', null, 'principle'), h('th', { class: 'num' }, 'rating'),
        h('th', { class: 'eval-only' }, 'side'), h('th', { class: 'num eval-only' }, 'weight'))), h('tbody', null, ratingRows)));
  }

  // ---------------------------------------------------------------- run page: routing between tabs
  function runPage(app, p) {
    const samples = samplesPanel(p);
    const view = h('div', { id: 'user-view', class: 'panel' });
    const panels = { results: resultsPanel(p), samples: samples.panel, details: detailsPanel(p), user: view };
    const tabs = ['results', 'samples', 'details'].map((name) => h('a', { id: 'tab-' + name, href: '#' + name, class: 'tab' }, name));
    app.append(runHeader(p), h('nav', { class: 'tabs' }, tabs), ...Object.values(panels));
    const route = () => {
      const hash = location.hash.replace(/^#/, '');
      const user = hash.match(/^user\/([^/]*)\/(.+)$/);
      const name = user ? 'user' : panels[hash] ? hash : 'results';
      Object.entries(panels).forEach(([key, node]) => { node.hidden = key !== name; });
      tabs.forEach((t) => t.classList.toggle('active', t.id === 'tab-' + (name === 'user' ? 'samples' : name)));
      if (name === 'samples') samples.show();
      if (user) { samples.show(); showUser(view, p, decodeURIComponent(user[1]), decodeURIComponent(user[2])); }
    };
    window.addEventListener('hashchange', route);
    route();
  }

  // ---------------------------------------------------------------- leaderboard and runs list
  const methodLink = (r) => (r.href ? h('a', { class: 'run-link', href: r.href, title: r.run_id || '' }, r.method) : r.method);

  const LEADERBOARD_COLUMNS = [
    { key: 'method', label: 'method', cell: methodLink },
    { key: 'delta', label: 'Δ', num: true, cell: (r) => deltaCell(r.delta), title: 'mean reward minus the baseline\'s' },
    { key: 'ci_low', label: '95% CI', num: true, cell: (r) => ci(r.ci_low, r.ci_high) },
    { key: 'win', label: 'W / T / L', num: true, cell: wtl },
    { key: 'gain', label: 'gain', num: true, cell: (r) => fixed(r.gain) },
    { key: 'lc_delta', label: 'LC Δ', num: true, cell: (r) => signed(r.lc_delta), title: 'length-controlled Δ' },
    { key: 'no_history_delta', label: 'Δ without history', num: true,
      cell: (r) => (isNum(r.no_history_delta)
        ? [signed(r.no_history_delta), h('span', { class: 'muted' }, ' ' + ci(r.no_history_ci_low, r.no_history_ci_high))] : DASH) },
    { key: 'failed_ratings', label: 'failed', num: true, cell: (r) => count(r.failed_ratings) },
    { key: 'generation_calls', label: 'generation calls', num: true, cell: (r) => count(r.generation_calls) },
    { key: 'training_steps', label: 'training steps', num: true, cell: (r) => count(r.training_steps) },
    { key: 'fit_seconds', label: 'fit time', num: true, cell: (r) => seconds(r.fit_seconds) },
  ];

  function pageHeader(p, extra) {
    return h('header', { class: 'page-header' }, h('h1', null, p.title || 'apm-bench'), extra);
  }

  function leaderboardPage(app, p) {
    const intro = String(p.intro || '').split(/\n\s*\n/).filter((x) => x.trim()).map((x) => h('p', { class: 'intro' }, x));
    const settings = (p.settings || []).map((setting, i) => section([setting.title || 'setting ' + (i + 1),
      setting.simulated ? simBadge(null) : null],
      sortable(LEADERBOARD_COLUMNS, setting.rows || [], { class: 'data sortable leaderboard-table', 'data-setting': i })));
    app.append(pageHeader(p, intro), h('div', { id: 'leaderboard' },
      settings.length ? settings : note('No settings yet.'), note('Click a column header to sort by it.')));
  }

  function runsPage(app, p) {
    const columns = [
      { key: 'run_id', label: 'run', cell: (r) => (r.href ? h('a', { class: 'run-link', href: r.href }, r.run_id) : r.run_id) },
      { key: 'created', label: 'created' },
      { key: 'model', label: 'model', cell: (r) => [plain(r.model), r.simulated ? [' ', simBadge(null)] : null] },
      { key: 'methods', label: 'methods', cell: (r) => (r.methods || []).join(', '), sort: (r) => (r.methods || []).join(',') },
      { key: 'worlds', label: 'worlds', cell: (r) => (r.worlds || []).join(', '), sort: (r) => (r.worlds || []).length },
      { key: 'wall_seconds', label: 'wall time', num: true, cell: (r) => seconds(r.wall_seconds) },
      { key: 'pooled', label: 'pooled Δ [95% CI]', sort: (r) => Math.max(...(r.pooled || []).map((x) => x.delta).filter(isNum)),
        cell: (r) => h('ul', { class: 'pooled' }, (r.pooled || []).map((x) => h('li', null, x.method + ' ', deltaCell(x.delta), ' ' + ci(x.ci_low, x.ci_high)))) },
    ];
    app.append(pageHeader(p, p.root ? h('p', { class: 'meta' }, h('code', null, p.root)) : null),
      section('Runs', (p.runs || []).length ? sortable(columns, p.runs, { id: 'runs-table' }) : note('No run folders here.')));
  }

  // ---------------------------------------------------------------- start
  function main() {
    const app = byId('app') || document.body.appendChild(h('div', { id: 'app' }));
    let payload;
    try {
      payload = JSON.parse(byId('apm-data').textContent);
    } catch (err) {
      app.append(note('This page carries no readable data: ' + err.message, { class: 'note error' }));
      return;
    }
    document.title = payload.title || document.title;
    document.body.setAttribute('data-kind', payload.kind);
    document.body.classList.toggle('eval-on', ui.evalView);
    const pages = { run: runPage, runs: runsPage, leaderboard: leaderboardPage };
    if (pages[payload.kind]) pages[payload.kind](app, payload);
    else app.append(note('Unknown page kind: ' + payload.kind, { class: 'note error' }));
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', main);
  else main();
})();
