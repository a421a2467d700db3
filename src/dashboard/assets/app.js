// switchboard dashboard. Vanilla JS, no dependencies, no inline code (the page's CSP
// forbids it). Every piece of data reaches the page through textContent or an SVG
// attribute, never as markup.
'use strict';

(function () {
  const SVG = 'http://www.w3.org/2000/svg';
  const RANGES = { '1h': 3600e3, '24h': 24 * 3600e3, '7d': 7 * 24 * 3600e3 };
  const PALETTE = ['#2f6fec', '#9b5cf6', '#12a39a', '#e3a03b', '#e0568a', '#6aa84f', '#8e99a8'];
  const REFRESH_MS = 10000;
  let range = '24h';
  let busy = false;
  let leaving = false;

  // ---- small DOM helpers -------------------------------------------------------
  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'text') e.textContent = v;
      else if (k === 'class') e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children || []) e.appendChild(typeof c === 'string' ? document.createTextNode(c) : c);
    return e;
  }
  function svg(tag, attrs, children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'text') e.textContent = v;
      else e.setAttribute(k, String(v));
    }
    for (const c of children || []) e.appendChild(c);
    return e;
  }
  function put(id, node) {
    const box = document.getElementById(id);
    box.replaceChildren(node);
  }
  function empty(text) { return el('div', { class: 'empty', text: text || 'No requests in this range.' }); }

  // ---- numbers -----------------------------------------------------------------
  // Amounts arrive as JSON numbers of exact decimals (at most 12 places): summed as
  // integer pico-USD so a total is the exact sum of its parts.
  function pico(x) { return BigInt(Math.round(Number(x || 0) * 1e12)); }
  function exactUSD(p) {
    const neg = p < 0n; if (neg) p = -p;
    const whole = p / 1000000000000n;
    let frac = (p % 1000000000000n).toString().padStart(12, '0').replace(/0+$/, '');
    if (frac.length < 2) frac = frac.padEnd(2, '0');
    return (neg ? '-$' : '$') + whole.toLocaleString('en-US') + '.' + frac;
  }
  function usd(x) {
    x = Number(x || 0);
    const a = Math.abs(x);
    if (a === 0) return '$0';
    if (a >= 1000) return '$' + x.toLocaleString('en-US', { maximumFractionDigits: 0 });
    if (a >= 1) return '$' + x.toFixed(2);
    if (a >= 0.01) return '$' + x.toFixed(4).replace(/0+$/, '').replace(/\.$/, '');
    return '$' + x.toPrecision(3).replace(/(\.\d*?)0+$/, '$1').replace(/\.$/, '');
  }
  // Axis ticks: two significant digits are enough to read a chart.
  function axisUSD(x) {
    if (x === 0) return '$0';
    if (x >= 1) return '$' + Number(x.toPrecision(2)).toLocaleString('en-US');
    return '$' + Number(x.toPrecision(2)).toString().replace(/^0\./, '.');
  }
  function ms(x) {
    if (x === null || x === undefined) return '–';
    x = Number(x);
    return x >= 10000 ? (x / 1000).toFixed(1) + ' s' : Math.round(x).toLocaleString('en-US') + ' ms';
  }
  function count(x) { return Number(x || 0).toLocaleString('en-US'); }
  function pct(x) { return (x * 100).toFixed(x > 0 && x < 0.1 ? 2 : 1) + ' %'; }
  function shortTime(iso, withDay) {
    const d = new Date(iso);
    if (isNaN(d)) return String(iso);
    const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    return withDay ? d.toLocaleDateString([], { month: 'short', day: 'numeric' }) + ' ' + hm : hm;
  }

  // ---- data --------------------------------------------------------------------
  async function get(path) {
    const res = await fetch(path, { credentials: 'same-origin', headers: { accept: 'application/json' } });
    if (res.status === 401) {
      // Logged out or a new token: back to the login form (once).
      if (!leaving) { leaving = true; window.location.assign('/dashboard'); }
      throw new Error('signed out');
    }
    const body = await res.json().catch(() => null);
    if (!res.ok) {
      const msg = body && body.error && body.error.message ? body.error.message : 'HTTP ' + res.status;
      throw new Error(path.split('?')[0] + ': ' + msg);
    }
    return (body && body.data) || [];
  }
  function keyLabel(g) {
    return (g && (g.key_name || g.key_id || g.key)) || '(no key)';
  }
  function hourOf(g) { return g && (g.hour || g.day || g.time); }

  // ---- charts ------------------------------------------------------------------
  // Hour buckets from `from` to `to`, so hours without requests show as zero.
  function buckets(from, to) {
    const out = [];
    const start = Math.floor(from / 3600e3) * 3600e3;
    for (let t = start; t <= to; t += 3600e3) out.push(t);
    return out;
  }
  // Stacked bars: rows of {group:{hour, …}, cost}, split by `label(group)`; the six
  // largest series by total, the rest as "other".
  function stacked(id, rows, label, from, to) {
    const times = buckets(from, to);
    const index = new Map(times.map((t, i) => [t, i]));
    const totals = new Map();
    for (const r of rows) totals.set(label(r.group), (totals.get(label(r.group)) || 0) + Number(r.cost || 0));
    if (![...totals.values()].some((v) => v > 0)) { put(id, empty()); return; }
    const names = [...totals.entries()].sort((a, b) => b[1] - a[1]).map((e) => e[0]);
    const top = names.slice(0, 6);
    const series = top.concat(names.length > 6 ? ['other'] : []);
    const grid = series.map(() => times.map(() => 0));
    for (const r of rows) {
      const t = Date.parse(hourOf(r.group));
      const i = index.get(Math.floor(t / 3600e3) * 3600e3);
      if (i === undefined) continue;
      let s = top.indexOf(label(r.group));
      if (s < 0) s = series.length - 1;
      grid[s][i] += Number(r.cost || 0);
    }
    const sums = times.map((_, i) => grid.reduce((a, g) => a + g[i], 0));
    const max = Math.max(...sums) || 1;
    const W = 600, H = 200, L = 64, B = 22, T = 8;
    const bw = (W - L) / times.length;
    const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img' });
    axes(root, max, axisUSD, W, H, L, B, T);
    times.forEach((t, i) => {
      let y = H - B;
      series.forEach((name, s) => {
        const v = grid[s][i];
        if (v <= 0) return;
        const h = (v / max) * (H - B - T);
        y -= h;
        const rect = svg('rect', { x: L + i * bw + bw * 0.12, y, width: Math.max(bw * 0.76, 1), height: Math.max(h, 0.5), fill: PALETTE[s % PALETTE.length] });
        rect.appendChild(svg('title', { text: `${name}: ${usd(v)} · ${shortTime(new Date(t).toISOString(), true)}` }));
        root.appendChild(rect);
      });
    });
    timeLabels(root, times, W, H, L, B, bw);
    const legend = el('div', { class: 'legend' });
    series.forEach((name, s) => {
      const swatch = el('i');
      swatch.style.background = PALETTE[s % PALETTE.length];
      legend.appendChild(el('span', {}, [swatch, el('span', { text: name }), el('span', { class: 'muted', text: usd(name === 'other' ? names.slice(6).reduce((a, n) => a + totals.get(n), 0) : totals.get(name)) })]));
    });
    const box = el('div', {}, [root, legend]);
    put(id, box);
  }
  function axes(root, max, fmt, W, H, L, B, T) {
    for (let k = 0; k <= 4; k++) {
      const y = H - B - (k / 4) * (H - B - T);
      root.appendChild(svg('line', { x1: L, x2: W, y1: y, y2: y, class: 'gridline' }));
      root.appendChild(svg('text', { x: L - 6, y: y + 3, 'text-anchor': 'end', class: 'axis', text: fmt((max * k) / 4) }));
    }
  }
  function timeLabels(root, times, W, H, L, B, bw) {
    const every = Math.max(1, Math.ceil(times.length / 4));
    const days = times.length > 24;
    times.forEach((t, i) => {
      if (i % every) return;
      root.appendChild(svg('text', { x: L + i * bw + bw / 2, y: H - 6, 'text-anchor': 'middle', class: 'axis', text: shortTime(new Date(t).toISOString(), days) }));
    });
  }
  function requestsChart(rows, from, to) {
    const times = buckets(from, to);
    const index = new Map(times.map((t, i) => [t, i]));
    const req = times.map(() => 0), err = times.map(() => 0);
    for (const r of rows) {
      const i = index.get(Math.floor(Date.parse(hourOf(r.group)) / 3600e3) * 3600e3);
      if (i === undefined) continue;
      req[i] += Number(r.requests || 0); err[i] += Number(r.errors || 0);
    }
    if (!req.some((v) => v > 0)) { put('chart-requests', empty()); return; }
    const max = Math.max(...req) || 1;
    const W = 600, H = 200, L = 64, B = 22, T = 8, R = 40;
    const bw = (W - L - R) / times.length;
    const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img' });
    axes(root, max, (v) => count(Math.round(v)), W - R, H, L, B, T);
    for (let k = 0; k <= 4; k += 2) {
      const y = H - B - (k / 4) * (H - B - T);
      root.appendChild(svg('text', { x: W - R + 6, y: y + 3, class: 'axis', text: (k * 25) + '%' }));
    }
    let path = '';
    times.forEach((t, i) => {
      const h = (req[i] / max) * (H - B - T);
      if (req[i] > 0) {
        const rect = svg('rect', { x: L + i * bw + bw * 0.12, y: H - B - h, width: Math.max(bw * 0.76, 1), height: Math.max(h, 0.5), class: 'bar-req' });
        rect.appendChild(svg('title', { text: `${shortTime(new Date(t).toISOString(), true)}: ${count(req[i])} requests, ${count(err[i])} errors` }));
        root.appendChild(rect);
      }
      const rate = req[i] ? err[i] / req[i] : 0;
      const x = L + i * bw + bw / 2, y = H - B - rate * (H - B - T);
      path += (path ? ' L' : 'M') + x.toFixed(1) + ' ' + y.toFixed(1);
    });
    root.appendChild(svg('path', { d: path, class: 'errline' }));
    timeLabels(root, times, W - R, H, L, B, bw);
    const legend = el('div', { class: 'legend' });
    const a = el('i'); a.style.background = PALETTE[0];
    const b = el('i'); b.style.background = 'var(--bad)';
    legend.append(el('span', {}, [a, 'requests']), el('span', {}, [b, 'error rate']));
    put('chart-requests', el('div', {}, [root, legend]));
  }

  // ---- tables ------------------------------------------------------------------
  function table(heads, rows) {
    const head = el('tr', {}, heads.map((h) => el('th', { class: h.num ? 'num' + (h.cls ? ' ' + h.cls : '') : h.cls || '', text: h.text })));
    const body = rows.map((cells) => el('tr', {}, cells.map((c, i) => {
      const td = el('td', { class: [heads[i].num ? 'num' : '', heads[i].cls || '', c.cls || ''].join(' ').trim() });
      if (c.node) td.appendChild(c.node); else td.textContent = c.text === undefined ? String(c) : c.text;
      return td;
    })));
    return el('div', { class: 'table-wrap' }, [el('table', {}, [el('thead', {}, [head]), el('tbody', {}, body)])]);
  }
  function meter(parts) {
    const m = el('div', { class: 'meter' });
    for (const [frac, cls] of parts) {
      const b = el('b', { class: cls || '' });
      b.style.width = Math.max(0, Math.min(100, frac * 100)).toFixed(1) + '%';
      m.appendChild(b);
    }
    return m;
  }
  function latency(rows) {
    if (!rows.length) { put('latency', empty()); return; }
    rows = rows.slice().sort((a, b) => Number(b.requests) - Number(a.requests));
    const max = Math.max(...rows.map((r) => Number(r.latency_ms_p95 || 0))) || 1;
    put('latency', table(
      [{ text: 'provider' }, { text: 'p50', num: true }, { text: 'p95', num: true }, { text: 'TTFT p50', num: true }, { text: '', cls: 'hide-phone' }],
      rows.map((r) => [
        r.group.provider || '(none)', ms(r.latency_ms_p50), ms(r.latency_ms_p95), ms(r.ttft_ms_p50),
        { node: meter([[Number(r.latency_ms_p95 || 0) / max, 'p95'], [Number(r.latency_ms_p50 || 0) / max]]) },
      ]),
    ));
  }
  function topKeys(rows) {
    rows = rows.filter((r) => Number(r.cost) > 0 || Number(r.requests) > 0)
      .sort((a, b) => Number(b.cost) - Number(a.cost)).slice(0, 10);
    if (!rows.length) { put('top-keys', empty()); return; }
    const max = Number(rows[0].cost) || 1;
    put('top-keys', table(
      [{ text: 'key' }, { text: 'requests', num: true }, { text: 'spend', num: true }, { text: '', cls: 'hide-phone' }],
      rows.map((r) => [keyLabel(r.group), count(r.requests), usd(r.cost), { node: meter([[Number(r.cost) / max]]) }]),
    ));
  }
  function endpoints(rows) {
    if (!rows.length) { put('endpoints', empty('No endpoints.')); return; }
    const rank = { parked: 0, degraded: 1, probing: 2, healthy: 3 };
    rows = rows.slice().sort((a, b) => (rank[a.state] ?? 9) - (rank[b.state] ?? 9) || String(a.model).localeCompare(String(b.model)));
    put('endpoints', table(
      [{ text: 'model' }, { text: 'provider' }, { text: 'state' }, { text: 'reason' }, { text: 'until', num: true }, { text: 'fails', num: true, cls: 'hide-phone' }, { text: 'TTFT', num: true, cls: 'hide-phone' }, { text: 'tok/s', num: true, cls: 'hide-phone' }],
      rows.map((e) => [
        { text: e.model, cls: 'mono' }, e.provider,
        { node: el('span', { class: 'pill ' + String(e.state), text: String(e.state) }) },
        e.reason || '', e.until ? shortTime(e.until, true) : '',
        count(e.consecutive_failures), ms(e.ttft_ms),
        e.tokens_per_second === null || e.tokens_per_second === undefined ? '–' : Number(e.tokens_per_second).toFixed(1),
      ]),
    ));
    const healthy = rows.filter((e) => e.state === 'healthy').length;
    document.getElementById('kpi-health').textContent = `${healthy} / ${rows.length}`;
  }
  function recent(rows) {
    if (!rows.length) { put('recent', empty()); return; }
    put('recent', table(
      [{ text: 'time' }, { text: 'key' }, { text: 'model' }, { text: 'provider', cls: 'hide-phone' }, { text: 'status', num: true }, { text: 'cost', num: true }, { text: 'latency', num: true }, { text: 'TTFT', num: true, cls: 'hide-phone' }, { text: 'app', cls: 'hide-phone' }],
      rows.map((r) => [
        shortTime(r.time, true), r.key_name || r.key_id || '', { text: r.model, cls: 'mono' }, r.provider || '',
        { text: String(r.status) + (r.error_code ? ' ' + r.error_code : ''), cls: r.status >= 400 ? 'status-err' : 'status-ok' },
        usd(r.cost), ms(r.latency_ms), ms(r.ttft_ms), r.app_title || '',
      ]),
    ));
  }

  // ---- refresh -----------------------------------------------------------------
  async function refresh() {
    if (busy || leaving) return;
    busy = true;
    const to = Date.now(), from = to - RANGES[range];
    const q = `from=${encodeURIComponent(new Date(from).toISOString().replace(/\.\d+Z$/, 'Z'))}&to=${encodeURIComponent(new Date(to).toISOString().replace(/\.\d+Z$/, 'Z'))}`;
    const status = document.getElementById('status');
    const jobs = {
      byKeyHour: get(`/admin/usage?group_by=hour,key&${q}`),
      byModelHour: get(`/admin/usage?group_by=hour,model&${q}`),
      byHour: get(`/admin/usage?group_by=hour&${q}`),
      byProvider: get(`/admin/usage?group_by=provider&${q}`),
      byKey: get(`/admin/usage?group_by=key&${q}`),
      endpoints: get('/admin/endpoints'),
      recent: get('/admin/requests?limit=25'),
    };
    const names = Object.keys(jobs);
    const settled = await Promise.allSettled(Object.values(jobs));
    busy = false;
    if (leaving) return;
    const got = {}, failed = [];
    settled.forEach((s, i) => { if (s.status === 'fulfilled') got[names[i]] = s.value; else failed.push(s.reason && s.reason.message); });
    if (got.byKeyHour) stacked('chart-key', got.byKeyHour, keyLabel, from, to);
    if (got.byModelHour) stacked('chart-model', got.byModelHour, (g) => g.model || '(none)', from, to);
    if (got.byHour) requestsChart(got.byHour, from, to);
    if (got.byProvider) latency(got.byProvider);
    if (got.byKey) {
      topKeys(got.byKey);
      const total = got.byKey.reduce((a, r) => a + pico(r.cost), 0n);
      document.getElementById('kpi-spend').textContent = exactUSD(total);
      const reqs = got.byKey.reduce((a, r) => a + Number(r.requests || 0), 0);
      const errs = got.byKey.reduce((a, r) => a + Number(r.errors || 0), 0);
      document.getElementById('kpi-requests').textContent = count(reqs);
      document.getElementById('kpi-errors').textContent = reqs ? pct(errs / reqs) : '–';
    }
    if (got.byProvider) {
      const served = got.byProvider.filter((r) => r.group.provider).sort((a, b) => Number(b.requests) - Number(a.requests));
      document.getElementById('kpi-latency').textContent = served.length ? `${ms(served[0].latency_ms_p50)} / ${ms(served[0].latency_ms_p95)}` : '–';
    }
    if (got.endpoints) endpoints(got.endpoints);
    if (got.recent) recent(got.recent);
    status.textContent = failed.length
      ? 'some panels failed: ' + failed.join('; ')
      : 'updated ' + new Date().toLocaleTimeString() + ' · every ' + REFRESH_MS / 1000 + ' s';
    status.classList.toggle('error', failed.length > 0);
  }

  function start() {
    for (const b of document.querySelectorAll('.range button')) {
      b.addEventListener('click', () => {
        range = b.dataset.range;
        for (const o of document.querySelectorAll('.range button')) o.classList.toggle('on', o === b);
        refresh();
      });
    }
    refresh();
    setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
    document.addEventListener('visibilitychange', () => { if (!document.hidden) refresh(); });
  }
  start();
})();
