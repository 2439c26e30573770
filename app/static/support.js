// The Recompute button: POST, poll the task until it is done, then show the account's new state.
(function () {
  "use strict";
  var section = document.getElementById("decision");
  var button = document.getElementById("recompute");
  var taskState = document.getElementById("task-state");
  if (!section || !button) { return; }
  var account = section.dataset.account;
  var headers = {"Accept": "application/json"};
  headers[section.dataset.csrfHeader] = section.dataset.csrf;

  function text(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = (value === null || value === undefined || value === "") ? "-" : String(value); }
  }

  function show(view) {
    var d = view.dunning;
    text("status", d.status);
    text("level", d.level);
    text("failure-class", d.failure_class);
    text("bad-debt", d.bad_debt ? "yes" : "no");
    text("outstanding", d.outstanding_amount);
    text("unpaid-since", d.unpaid_since);
    text("retries-used", d.retries_used);
    text("next-retry", d.next_retry_at ? d.next_retry_at + (d.retry_invoice_id ? " (invoice " + d.retry_invoice_id + ")" : "") : null);
    text("version", d.version);
    text("last-trigger", d.last_trigger);
    text("changed-at", d.changed_at);
    var list = document.getElementById("reasons");
    list.textContent = "";
    (d.reasons || []).forEach(function (r) {
      var li = document.createElement("li");
      var code = document.createElement("code");
      code.textContent = r.rule;
      li.appendChild(code);
      li.appendChild(document.createTextNode(": " + r.detail));
      list.appendChild(li);
    });
  }

  function fail(message) {
    taskState.textContent = message;
    taskState.className = "error";
    button.disabled = false;
  }

  function poll(url, deadline) {
    fetch(url, {headers: headers, credentials: "same-origin"}).then(function (r) { return r.json(); }).then(function (t) {
      taskState.textContent = "task " + t.state.toLowerCase();
      if (!t.done) {
        if (Date.now() > deadline) { return fail("the task did not finish in time; refresh later"); }
        return setTimeout(function () { poll(url, deadline); }, 300);
      }
      if (t.state !== "SUCCESS") { return fail("recompute failed: " + (t.error || t.state)); }
      return fetch("/support/accounts/" + encodeURIComponent(account) + "/state", {headers: headers, credentials: "same-origin"})
        .then(function (r) { return r.json(); })
        .then(function (view) {
          show(view);
          taskState.textContent = "recomputed: " + t.result.outcome;
          taskState.className = "done";
          button.disabled = false;
        });
    }).catch(function (e) { fail("error: " + e); });
  }

  button.addEventListener("click", function () {
    button.disabled = true;
    taskState.className = "muted";
    taskState.textContent = "queued";
    fetch("/support/accounts/" + encodeURIComponent(account) + "/recompute",
          {method: "POST", headers: headers, credentials: "same-origin"})
      .then(function (r) { return r.json().then(function (body) { return {status: r.status, body: body}; }); })
      .then(function (res) {
        if (res.status !== 202) { return fail("not queued: " + (res.body.reason || res.status)); }
        poll(res.body.status_url, Date.now() + 60000);
      })
      .catch(function (e) { fail("error: " + e); });
  });
}());
