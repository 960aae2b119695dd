from kdrepro.cli import run

run()
