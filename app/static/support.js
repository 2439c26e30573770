// The Recompute button: POST, poll the task until it is done, then show the account as it is now.
(function () {
  "use strict";
  var section = document.getElementById("decision");
  var button = document.getElementById("recompute");
  var taskState = document.getElementById("task-state");
  if (!section || !button) { return; }
  // The page's own URL and its Recompute's, as the server built them for this account id, in the
  // query form (app/account_urls.py: /support/account?id=<id>, which a browser sends as it is, for
  // "." and ".." too): the refresh goes to the page, and the sign-in comes back to it.
  var page = section.dataset.page;
  var recomputeUrl = section.dataset.recompute;
  var headers = {"Accept": "application/json"};
  headers[section.dataset.csrfHeader] = section.dataset.csrf;
  // Everything a recompute may change, by id: the state (lifting included), its reasons, and the
  // tables (an episode opens or closes, retries are planned, stuck work resolves, a call to Account
  // Management is written or superseded). Taken from the page as the server renders it now, so the
  // page never shows one moment beside another.
  var REFRESHED = ["state", "reasons", "invoices", "retries", "stuck", "episodes", "bad-debt-payments",
                   "outbox-summary", "outbox"];

  function refresh() {
    return fetch(page, {headers: {"Accept": "text/html"}, credentials: "same-origin"})
      .then(function (r) {
        if (r.status === 401) { throw new SessionEnded(); }
        if (!r.ok) { throw new Error("the page answered " + r.status); }
        return r.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        REFRESHED.forEach(function (id) {
          var shown = document.getElementById(id);
          var now = fresh.getElementById(id);
          if (shown && now) { shown.replaceWith(document.importNode(now, true)); }
        });
      });
  }

  function fail(message) {
    taskState.textContent = message;
    taskState.className = "error";
    button.disabled = false;
  }

  // The session ended (signed out, in another tab too, or its 12 hours over): the API's 401 speaks
  // of bearer tokens, which a support person signed in by the form never uses.
  function SessionEnded() {}

  function signedOut() {
    taskState.textContent = "your session has ended: ";
    var link = document.createElement("a");
    link.href = "/support/login?next=" + encodeURIComponent(page);
    link.textContent = "sign in again";
    taskState.appendChild(link);
    taskState.className = "error";
    button.disabled = false;
  }

  function later(deadline, seconds, then) {
    if (Date.now() > deadline) { return fail("the task did not finish in time; refresh later"); }
    return setTimeout(then, seconds * 1000);
  }

  function poll(url, deadline) {
    fetch(url, {headers: headers, credentials: "same-origin"}).then(function (r) {
      return r.json().then(function (body) { return {status: r.status, retryAfter: r.headers.get("Retry-After"), t: body}; });
    }).then(function (res) {
      var t = res.t;
      if (res.status === 503) {
        // The result store did not answer: the task runs all the same; ask again when told to.
        taskState.textContent = "waiting for the task's status";
        return later(deadline, Math.min(Number(res.retryAfter) || 1, 10), function () { poll(url, deadline); });
      }
      if (res.status === 401) { return signedOut(); }
      if (res.status !== 200) { return fail("no task status: " + (t.reason || res.status)); }
      // A task waiting for its retry says why it failed (the database, a lock...): it may be a while.
      taskState.textContent = "task " + t.state.toLowerCase() + (t.state === "RETRY" && t.error ? ": " + t.error : "");
      if (!t.done) { return later(deadline, 0.3, function () { poll(url, deadline); }); }
      // EXPIRED, NOT_QUEUED: no failure of the recompute; the answer says what became of it.
      if (t.state !== "SUCCESS") {
        var message = t.reason || "recompute failed: " + (t.error || t.state);
        // A recompute given up leaves its Stuck work row (the whole error, its state, its next
        // re-drive), and the account may have changed meanwhile: show the account as it is now, then
        // say what went wrong, whether or not the page could be read again.
        var said = function () { fail(message); };
        return refresh().then(said, said);
      }
      var done = "recomputed: " + t.result.outcome;
      return refresh().then(function () {
        taskState.textContent = done;
        taskState.className = "done";
        button.disabled = false;
      }, function (e) {
        // The recompute is done all the same: say so, and that what the page shows is from before it.
        if (e instanceof SessionEnded) { throw e; }
        fail(done + ", but the page could not be read again (" + e.message + "): what it shows is from " +
             "before the recompute; reload it");
      });
    }).catch(function (e) { return e instanceof SessionEnded ? signedOut() : fail("error: " + e); });
  }

  button.addEventListener("click", function () {
    button.disabled = true;
    taskState.className = "muted";
    taskState.textContent = "queued";
    fetch(recomputeUrl, {method: "POST", headers: headers, credentials: "same-origin"})
      .then(function (r) { return r.json().then(function (body) { return {status: r.status, body: body}; }); })
      .then(function (res) {
        if (res.status === 401) { return signedOut(); }
        if (res.status === 403) {
          // The session is valid but not the one this page was opened in (signed in again since, in
          // another tab say): its CSRF token is the old session's. Nothing was queued.
          return fail("not queued: this page was opened before you signed in again; reload it, then press " +
                      "Recompute again");
        }
        if (res.status !== 202) { return fail("not queued: " + (res.body.reason || res.status)); }
        poll(res.body.status_url, Date.now() + 60000);
      })
      .catch(function (e) { fail("error: " + e); });
  });
}());
