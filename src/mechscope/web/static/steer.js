// Steer playground: rows of (feature, mode, strength); POST /api/steer; show steered vs plain text.
(function () {
  var form = document.getElementById('steer-form'), body = document.querySelector('#steers tbody');
  var status = document.getElementById('status');
  function wire(row) {
    var slider = row.querySelector('.strength-slider'), num = row.querySelector('.strength');
    slider.addEventListener('input', function () { num.value = slider.value; });
    num.addEventListener('input', function () { slider.value = num.value; });
    row.querySelector('.remove').addEventListener('click', function () {
      if (body.querySelectorAll('tr').length > 1) row.remove();
    });
  }
  body.querySelectorAll('tr').forEach(wire);
  document.getElementById('add-steer').addEventListener('click', function () {
    var row = body.querySelector('tr').cloneNode(true);
    body.appendChild(row); wire(row);
  });
  form.addEventListener('submit', function (e) {
    e.preventDefault();
    var steers = Array.prototype.map.call(body.querySelectorAll('tr'), function (r) {
      return {feature: parseInt(r.querySelector('.feature').value, 10),
              mode: r.querySelector('.mode').value,
              strength: parseFloat(r.querySelector('.strength').value)};
    });
    var req = {prompt: document.getElementById('prompt').value, steers: steers,
               max_new_tokens: parseInt(document.getElementById('max-new').value, 10)};
    status.className = 'sub'; status.textContent = 'generating…';
    fetch('/api/steer', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(req)})
      .then(function (r) { return r.json().then(function (j) { return [r.ok, j]; }); })
      .then(function (res) {
        if (!res[0]) { status.className = 'error'; status.textContent = res[1].error; return; }
        document.getElementById('steered').textContent = res[1].steered;
        document.getElementById('unsteered').textContent = res[1].unsteered;
        status.textContent = res[1].steered === res[1].unsteered ? 'done: identical (try a larger strength)' : 'done';
      });
  });
})();
