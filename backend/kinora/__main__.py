from kinora.cli.main import main

main()
