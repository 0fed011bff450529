// pgguard approval page: keeps a pending request's state and time left current without
// reloading the page, so a comment being typed is never lost. When the request is decided
// elsewhere (or expires), the form is disabled and a note says so; the page reloads by itself
// only when the comment box is empty.
(function () {
  "use strict";
  var script = document.currentScript;
  var url = script && script.getAttribute("data-status");
  if (!url) { return; }
  var state = document.getElementById("state");
  var when = document.getElementById("when");
  var whenTitle = document.getElementById("when-title");
  var note = document.getElementById("decided-elsewhere");
  var form = document.getElementById("decision");
  function settle(status) {
    var comment = form ? form.querySelector("textarea") : null;
    if (!comment || comment.value === "") { window.location.reload(); return; }
    note.textContent = "This request is now " + status.state +
      " (decided elsewhere or expired); your comment was kept but can no longer be sent.";
    note.hidden = false;
    var buttons = form.querySelectorAll("button");
    for (var i = 0; i < buttons.length; i++) { buttons[i].disabled = true; }
  }
  function poll() {
    fetch(url, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (status) {
        if (!status) { return; }
        state.textContent = status.state;
        state.className = "state " + status.state;
        whenTitle.textContent = status.when_title;
        when.textContent = status.when;
        if (status.state !== "pending") { settle(status); return; }
        window.setTimeout(poll, 5000);
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 5000);
})();
