"""The chat app re-measures a drifted hardware profile while it sits idle (issue 19).

run_log.profile_drifted says when the cached profile's predictions missed the last real runs
by more than 25% (a profile measured on a busy machine). `moechat plan` and `profile` then
re-measure it, and so does the chat app, quietly: once it has been idle for IDLE_S (no reply
streaming, no model loading), a thread worker calls run_log.remeasure_if_drifted, which
measures only if the whole machine is idle too, with one line in the status bar. Input stays
live; a reply or a model load started meanwhile stops the measurement at its next window
(hardware_profile.measure_profile: about a second) and nothing is cached, since a profile
measured beside a reply would be wrong in the same way. The check itself is one SQLite query,
so it runs again after every idle period.

A mixin of MoechatApp (app.py), which owns the state it reads; kept apart like commands.py.
"""

from __future__ import annotations

import threading
import time

from textual import work

from moechat.app.tui.messages import ProfileRemeasure

IDLE_S = 60.0  # seconds without a reply or a model load before the check runs


class ProfileRefresh:
    """Re-measuring a drifted profile when idle; `self` is the app."""

    remeasure_idle_s: float | None = IDLE_S  # None: never (the app's other tests)
    remeasure_state = ""  # "", "measuring", "done", "unchanged", "stopped", "failed"
    _remeasure_timer = None
    _remeasure_cancel: threading.Event | None = None  # set while a check or measurement runs

    def arm_remeasure(self) -> None:
        """(Re)start the idle clock: after remeasure_idle_s with nothing else running, check."""
        if self._remeasure_timer is not None:
            self._remeasure_timer.stop()
            self._remeasure_timer = None
        if self.remeasure_idle_s is not None:
            self._remeasure_timer = self.set_timer(self.remeasure_idle_s, self._remeasure_when_idle)

    def stop_remeasure(self) -> None:
        """The CPU is wanted (a reply, a model load): no measurement now, and stop one running."""
        if self._remeasure_timer is not None:
            self._remeasure_timer.stop()
            self._remeasure_timer = None
        if self._remeasure_cancel is not None:
            self._remeasure_cancel.set()

    def _remeasure_when_idle(self) -> None:
        self._remeasure_timer = None
        if self.generating or self.loading or self.waiting_for_model or self._remeasure_cancel:
            return  # the idle clock starts again when that ends
        self._remeasure_cancel = threading.Event()
        self._remeasure(self._remeasure_cancel)

    @work(thread=True, exclusive=True, group="profile")
    def _remeasure(self, cancel: threading.Event) -> None:
        from moechat.backends.plan.hardware_profile import MeasureCancelled
        from moechat.backends.plan.run_log import remeasure_if_drifted

        t0 = time.monotonic()
        try:
            profile = remeasure_if_drifted(
                progress=lambda step: self.post_message(ProfileRemeasure("measuring", step)),
                cancel=cancel)
        except MeasureCancelled:
            self.post_message(ProfileRemeasure("stopped"))
            return
        except Exception as err:  # shown in the status bar; the chat goes on
            self.post_message(ProfileRemeasure("failed", f"{type(err).__name__}: {err}"))
            return
        if profile is None:  # not drifted, or the machine is busy: nothing to do now
            self.post_message(ProfileRemeasure("unchanged"))
            return
        seconds = time.monotonic() - t0
        predicted = self._predict_loaded()
        self.post_message(ProfileRemeasure("done", f"{seconds:.0f} s", predicted))

    def _predict_loaded(self) -> float | None:
        from moechat.app.tui.planner_bridge import predicted_decode_tok_s

        if self.engine is None:
            return None
        try:
            return predicted_decode_tok_s(self.card, self.engine)
        except Exception:  # a planner bug costs the comparison, never the chat
            return None

    def on_profile_remeasure(self, message: ProfileRemeasure) -> None:
        self.remeasure_state = message.state
        shown = not (self.generating or self.waiting_for_model)  # a reply's own note wins
        if message.state == "measuring":
            if shown:
                self.status.note = (f"re-measuring this machine (the profile's predictions "
                                    f"drifted; idle): {message.detail}")
            return
        self._remeasure_cancel = None
        if message.state == "done":
            if message.predicted_decode_tok_s:
                self.status.predicted_decode_tok_s = message.predicted_decode_tok_s
            if shown:
                self.status.note = f"profile re-measured in {message.detail} (it had drifted)"
        elif message.state == "failed":
            if shown:
                self.status.note = f"could not re-measure the profile: {message.detail}"
            return  # not again this session
        elif message.state == "stopped" and shown and self.status.note.startswith("re-measuring"):
            self.status.note = ""
        self.arm_remeasure()
