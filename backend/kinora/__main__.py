from kinora.cli import main

main()
