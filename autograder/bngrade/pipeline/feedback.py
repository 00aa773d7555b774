"""Feedback: what a student may see of the graded notebook, and what the instructor's browser may run of it.

* :class:`ShortTracebacks` (a GenerateFeedback preprocessor) keeps hidden tests out of the tracebacks.
* :class:`SafeFeedbackExporter` (``c.GenerateFeedback.exporter_class``) writes the feedback page. Every piece of
  student HTML is sanitized with ``nh3`` (the Ammonia sanitizer) where the page is rendered: markdown cells
  (and the graders' comments) as rendered to HTML, ``text/html`` and ``text/markdown`` outputs, raw cells.
  JavaScript outputs, widgets and their state are left out. A Content-Security-Policy, the first element of
  ``<head>``, forbids every script, frame, form and remote resource besides.

What that costs: no script runs in the page, so MathJax is not loaded (formulas show as TeX, as they would
offline anyway); images show only as the notebook's outputs, never from a path, a URL or an attachment of a
markdown cell; styles come from the page's own stylesheet (no ``style`` attributes or ``<style>`` from the student).
"""
import re

import markupsafe
import nh3
from jinja2 import pass_context
from nbconvert.exporters import HTMLExporter
from nbgrader.preprocessors import NbGraderPreprocessor
from traitlets import Bool

#: no script, frame, form, plugin or remote resource; the page's inline styles and embedded images only
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:; "
       "form-action 'none'; base-uri 'none'")
CSP_META = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
HEAD = re.compile(r"<head(\s[^>]*)?>", re.IGNORECASE)
#: Ammonia's defaults (no script, no event handler, no javascript: URL), plus classes for code highlighting
ATTRIBUTES = {**{tag: set(names) for tag, names in nh3.ALLOWED_ATTRIBUTES.items()}, "*": {"class"}}


def clean(html):
    """``html`` from a student, made safe to show (a Jinja filter: the result is marked safe)."""
    return markupsafe.Markup(nh3.clean(str(html), attributes=ATTRIBUTES))  # noqa: S704 (sanitized just now)


class ShortTracebacks(NbGraderPreprocessor):
    """Replace every error traceback by its last line, ``ExceptionName: message``.

    A traceback quotes the source lines of each frame, hidden tests included;
    the message alone says what is wrong without showing how it was tested.
    """

    def preprocess_cell(self, cell, resources, cell_index):
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                output.traceback = [f"{output.ename}: {output.evalue}"]
        return cell, resources


class SafeFeedbackExporter(HTMLExporter):
    """nbgrader's feedback HTML, with student HTML sanitized by nh3 and a CSP that forbids scripts."""

    sanitize_html = Bool(True, help="sanitize outputs and raw cells (with nh3) and leave out scripts").tag(config=True)

    @pass_context
    def safe_markdown2html(self, context, source):
        """The markdown filter of nbconvert (attachments, anchors), then nh3: nbgrader's feedback template
        renders markdown cells with it and with nothing else."""
        return clean(self.markdown2html(context, source))

    def default_filters(self):
        yield from super().default_filters()
        yield ("markdown2html", self.safe_markdown2html)
        yield ("clean_html", clean)

    def from_notebook_node(self, nb, resources=None, **kw):
        html, resources = super().from_notebook_node(nb, resources, **kw)
        head = HEAD.search(html)
        if head is None:
            raise ValueError("the feedback page has no <head> to put its Content-Security-Policy in")
        return html[:head.end()] + CSP_META + html[head.end():], resources
