"""Feedback preprocessing: what a student may see of the graded notebook."""
from nbgrader.preprocessors import NbGraderPreprocessor


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
