// Text search: debounce typing, GET /api/search, draw the tokens; a token click lists its features,
// a feature click shades every token by that feature's activation.
(function () {
  var box = document.getElementById('text'), status = document.getElementById('status');
  var toks = document.getElementById('tokens'), perTok = document.getElementById('token-features');
  var topT = document.getElementById('top-features'), label = document.getElementById('tok-label');
  var data = null, timer = null, seq = 0;
  function esc(s) { var d = document.createElement('span'); d.textContent = s; return d.innerHTML; }
  function link(id) { return '<a href="/feature/' + id + '">#' + id + '</a>'; }
  function shade(acts) {
    var mx = Math.max.apply(null, acts.concat([0])) || 1;
    toks.querySelectorAll('span').forEach(function (s, i) {
      var a = acts ? acts[i] / mx : 0;
      s.style.background = a > 0 ? 'rgba(255,120,0,' + (0.85 * a).toFixed(3) + ')' : '';
      s.title = acts ? JSON.stringify(data.tokens[i]) + ': ' + acts[i].toFixed(4) : '';
    });
  }
  function pickToken(i) {
    toks.querySelectorAll('span').forEach(function (s, j) { s.classList.toggle('sel', i === j); });
    label.textContent = JSON.stringify(data.tokens[i]);
    var rows = data.per_token[i].map(function (f) {
      return '<tr><td>' + link(f.id) + '</td><td>' + f.act.toFixed(3) + '</td></tr>';
    });
    perTok.innerHTML = rows.length ? rows.join('') : '<tr><td class="none">no feature fires here</td></tr>';
  }
  function draw() {
    toks.innerHTML = data.tokens.map(function (t, i) {
      return '<span data-i="' + i + '">' + esc(t) + '</span>';
    }).join('');
    toks.querySelectorAll('span').forEach(function (s, i) { s.addEventListener('click', function () { pickToken(i); }); });
    topT.innerHTML = data.top.length ? '<tr><th>feature</th><th>max</th><th>on</th><th>explanation</th></tr>' +
      data.top.map(function (f, j) {
        return '<tr class="top-feature" data-j="' + j + '"><td>' + link(f.id) + '</td><td>' + f.max.toFixed(3) +
          '</td><td>' + esc(JSON.stringify(data.tokens[f.token])) + '</td><td>' + esc(f.explanation || '') + '</td></tr>';
      }).join('') : '<tr><td class="none">no feature fires on this text</td></tr>';
    topT.querySelectorAll('tr.top-feature').forEach(function (r) {
      r.addEventListener('mouseenter', function () { shade(data.top[+r.dataset.j].acts); });
    });
    if (data.top.length) shade(data.top[0].acts);
    pickToken(data.top.length ? data.top[0].token : 0);
  }
  function run() {
    var text = box.value, mine = ++seq;
    if (!text.trim()) { status.textContent = ''; return; }
    status.textContent = 'running…';
    fetch('/api/search?' + new URLSearchParams({text: text})).then(function (r) {
      return r.json().then(function (j) { return [r.ok, j]; });
    }).then(function (res) {
      if (mine !== seq) return;  // a newer request is on its way
      if (!res[0]) { status.textContent = res[1].error; status.className = 'error'; return; }
      status.className = 'sub'; data = res[1];
      status.textContent = data.tokens.length + ' tokens · ' + data.top.length + ' features fire';
      draw();
    });
  }
  box.addEventListener('input', function () { clearTimeout(timer); timer = setTimeout(run, 300); });
  if (box.value.trim()) run();
})();
