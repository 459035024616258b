from teacherfit.cli import app

app()
