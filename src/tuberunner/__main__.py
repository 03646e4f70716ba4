from tuberunner.cli import main

main()
