// Moderator dashboard behaviour: keyboard shortcuts, the shortcuts help, the blur toggle and
// confirmations. Loaded with <script src="..." defer>; the pages run under a strict CSP
// (script-src 'self', style-src 'self'), so nothing here evaluates strings or writes inline
// styles. Everything hangs off attributes in the markup:
//
//   data-key="a"              a key press clicks the first visible, enabled element with it
//   <dialog id="shortcuts">   the help overlay; "?" opens and closes it
//   data-help-toggle          a button that opens and closes the help overlay
//   <body data-blur="on|off"> whether the page starts with images blurred
//   data-blur-toggle          a button that blurs or reveals the images on this page
//   data-confirm="text"       on a <form> or its submit button: ask before submitting
//
// Lease renewal is left to htmx attributes in the markup.
(() => {
  "use strict";

  const HELP_DIALOG_ID = "shortcuts";
  const HELP_KEY = "?";
  const EDITABLE = "input, textarea, select, [contenteditable]:not([contenteditable='false'])";

  /** True when key presses on this element type text rather than trigger shortcuts. */
  function isEditable(target) {
    if (!(target instanceof Element)) {
      return false;
    }
    return target.closest(EDITABLE) !== null || (target instanceof HTMLElement && target.isContentEditable);
  }

  function helpDialog() {
    const dialog = document.getElementById(HELP_DIALOG_ID);
    return dialog instanceof HTMLDialogElement ? dialog : null;
  }

  /** A confirmation or other dialog owns the keyboard until it is closed. */
  function otherDialogOpen() {
    for (const dialog of document.querySelectorAll("dialog[open]")) {
      if (dialog.id !== HELP_DIALOG_ID) {
        return true;
      }
    }
    return false;
  }

  function toggleHelp() {
    const dialog = helpDialog();
    if (dialog === null) {
      return false;
    }
    if (dialog.open) {
      dialog.close();
    } else {
      dialog.showModal();
    }
    return true;
  }

  function isVisible(element) {
    if (typeof element.checkVisibility === "function") {
      return element.checkVisibility({ visibilityProperty: true });
    }
    return element.getClientRects().length > 0;
  }

  /** `:disabled` also covers controls inside a disabled fieldset. */
  function isEnabled(element) {
    return !element.matches(":disabled") && element.getAttribute("aria-disabled") !== "true";
  }

  /** The element a shortcut acts on: the first in document order that a person could click. */
  function shortcutTarget(key) {
    for (const element of document.querySelectorAll("[data-key]")) {
      if (element.dataset.key === key && isVisible(element) && isEnabled(element)) {
        return element;
      }
    }
    return null;
  }

  function onKeyDown(event) {
    if (event.defaultPrevented || event.isComposing || event.repeat) {
      return;
    }
    // Shift stays allowed: "?" and capital letters need it on most layouts.
    if (event.ctrlKey || event.altKey || event.metaKey || event.key.length !== 1) {
      return;
    }
    if (isEditable(event.target) || otherDialogOpen()) {
      return;
    }
    if (event.key === HELP_KEY) {
      if (toggleHelp()) {
        event.preventDefault();
      }
      return;
    }
    const target = shortcutTarget(event.key);
    if (target === null) {
      return;
    }
    event.preventDefault();
    // The help is modal: close it so the page behind it is what the click acts on.
    const dialog = helpDialog();
    if (dialog !== null && dialog.open) {
      dialog.close();
    }
    target.click();
  }

  /** The page's current blur state lives in the `revealed` class and mirrors into data-blur,
   *  which is what the stylesheet reads before this script has run. */
  function setRevealed(revealed) {
    document.body.classList.toggle("revealed", revealed);
    document.body.dataset.blur = revealed ? "off" : "on";
    for (const button of document.querySelectorAll("[data-blur-toggle]")) {
      button.setAttribute("aria-pressed", String(revealed));
    }
  }

  function onClick(event) {
    if (!(event.target instanceof Element)) {
      return;
    }
    if (event.target.closest("[data-blur-toggle]") !== null) {
      setRevealed(!document.body.classList.contains("revealed"));
      return;
    }
    if (event.target.closest("[data-help-toggle]") !== null) {
      toggleHelp();
    }
  }

  /** Runs in the capture phase, ahead of htmx's own submit handling, so a declined
   *  confirmation stops both a plain submission and an htmx request. */
  function onSubmit(event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement)) {
      return;
    }
    const submitter = event.submitter;
    const question =
      (submitter instanceof HTMLElement ? submitter.dataset.confirm : undefined) ?? form.dataset.confirm;
    if (question === undefined || question === "") {
      return;
    }
    if (!window.confirm(question)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  }

  function start() {
    setRevealed(document.body.dataset.blur === "off");
    document.addEventListener("keydown", onKeyDown);
    document.addEventListener("click", onClick);
    document.addEventListener("submit", onSubmit, true);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
