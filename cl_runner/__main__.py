from cl_runner.cli import main

main()
