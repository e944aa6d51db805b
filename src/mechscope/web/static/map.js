// Feature map: GET /api/map once, draw the points on a canvas; wheel zooms about the cursor, drag pans,
// hover names the nearest dot, click opens it. window.msMap exposes the view for tests.
(function () {
  var canvas = document.getElementById('map'), ctx = canvas.getContext('2d');
  var tip = document.getElementById('tip'), status = document.getElementById('status');
  var P = null, view = null, drag = null, moved = false, R = 3;  // R: dot size, larger when few
  function fit() {
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;  // a loop: apply() overflows at ~100k
    for (var i = 0; i < P.n; i++) {
      x0 = Math.min(x0, P.x[i]); x1 = Math.max(x1, P.x[i]); y0 = Math.min(y0, P.y[i]); y1 = Math.max(y1, P.y[i]);
    }
    var s = 0.9 * Math.min(canvas.width / ((x1 - x0) || 1), canvas.height / ((y1 - y0) || 1));
    view = {s: s, tx: canvas.width / 2 - s * (x0 + x1) / 2, ty: canvas.height / 2 + s * (y0 + y1) / 2};
  }
  function screen(i) { return [view.tx + view.s * P.x[i], view.ty - view.s * P.y[i]]; }
  function colour(d) {
    var t = d > 0 ? Math.min(1, Math.max(0, (Math.log10(d) + 6) / 6)) : 0;  // 1e-6 .. 1
    return 'hsl(' + (240 - 200 * t).toFixed(0) + ',70%,' + (d > 0 ? 45 : 80) + '%)';
  }
  function draw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    for (var i = 0; i < P.n; i++) {
      var p = screen(i);
      if (p[0] < -R || p[1] < -R || p[0] > canvas.width + R || p[1] > canvas.height + R) continue;
      ctx.fillStyle = colour(P.density[i]);
      ctx.fillRect(p[0] - R / 2, p[1] - R / 2, R, R);
    }
  }
  function nearest(mx, my) {
    var best = -1, bd = 64;  // within 8 px
    for (var i = 0; i < P.n; i++) {
      var p = screen(i), d = (p[0] - mx) * (p[0] - mx) + (p[1] - my) * (p[1] - my);
      if (d < bd) { bd = d; best = i; }
    }
    return best;
  }
  function pos(e) { var r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }
  canvas.addEventListener('wheel', function (e) {
    e.preventDefault();
    var m = pos(e), k = Math.exp(-e.deltaY * 0.0015);
    view.tx = m[0] - k * (m[0] - view.tx); view.ty = m[1] - k * (m[1] - view.ty); view.s *= k;
    draw();
  }, {passive: false});
  canvas.addEventListener('mousedown', function (e) { drag = pos(e); moved = false; });
  window.addEventListener('mouseup', function () { drag = null; });
  canvas.addEventListener('mousemove', function (e) {
    var m = pos(e);
    if (drag) {
      var dx = m[0] - drag[0], dy = m[1] - drag[1];
      if (Math.abs(dx) + Math.abs(dy) > 2) moved = true;
      view.tx += dx; view.ty += dy; drag = m; draw(); return;
    }
    var i = nearest(m[0], m[1]);
    if (i < 0) { tip.style.display = 'none'; return; }
    tip.style.display = 'block'; tip.style.left = (m[0] + 12) + 'px'; tip.style.top = (m[1] + 12) + 'px';
    tip.textContent = '#' + i + ' · density ' + (100 * P.density[i]).toPrecision(3) + '%';
  });
  canvas.addEventListener('mouseleave', function () { tip.style.display = 'none'; });
  canvas.addEventListener('click', function (e) {
    if (moved) return;
    var m = pos(e), i = nearest(m[0], m[1]);
    if (i >= 0) window.location.href = '/feature/' + i;
  });
  document.getElementById('reset').addEventListener('click', function () { fit(); draw(); });
  fetch('/api/map').then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
    .then(function (res) {
      if (!res[0]) { status.className = 'error'; status.textContent = res[1].error; return; }
      P = res[1]; R = P.n < 5000 ? 6 : 3; fit(); draw();
      status.textContent = P.n + ' features';
      window.msMap = {ready: true, n: P.n, screen: function (i) { return screen(i); }};
      canvas.dataset.ready = '1';
    });
})();
